"""The `cachefs` fsspec filesystem against a real master and worker (processes, TCP, a
local-directory store): every byte, ranges, file objects, listings, globs, pyarrow datasets,
errors, read-only refusals, instance caching, fork, and discovery by entry point."""

from __future__ import annotations

import errno
import io
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cachefs.fsspec import CachefsFileSystem
from cachefs.meta import BLOCK_SIZE
from tests.fuse.conftest import make_files
from tests.procs import master_process, run_cli, worker_process

NAME = "frames"


def table(first: int, rows: int) -> pa.Table:
    ids = list(range(first, first + rows))
    return pa.table({"id": ids, "label": [f"img_{i:05d}.jpg" for i in ids],
                     "score": [i / 7 for i in ids]})  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master, a worker and a dataset: 150 small files, .jpg files, a file of 2.5 blocks,
    a parquet file of several row groups and a directory of three parquet files; yields
    (master, src, files) with files = every source file's relative path -> bytes."""
    tmp = tmp_path_factory.mktemp("fsspec")
    src = tmp / "src"
    make_files(src, 150, max_size=20_000, seed=16)
    (src / "big.bin").write_bytes(os.urandom(2 * BLOCK_SIZE + BLOCK_SIZE // 2))
    for i, rel in enumerate(["images/a/x.jpg", "images/a/y.jpg", "images/b/c/z.jpg", "top.jpg"]):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(100 + i))
    (src / "images/a/notes.txt").write_text("not an image")
    pq.write_table(table(0, 5000), src / "table.parquet", row_group_size=1000)
    (src / "tables").mkdir()
    for part in range(3):
        pq.write_table(table(part * 100, 100), src / f"tables/part-{part}.parquet")
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    master = master_process(tmp)
    master.start()
    worker = worker_process(tmp, master.address, "w1", "128M")
    try:
        worker.start()
        result = run_cli("dataset", "add", NAME, f"file://{src}", "--master", master.address)
        assert result.returncode == 0, result.stderr
        yield master, src, files
    finally:
        worker.stop()
        master.stop()


@pytest.fixture
def fs(cluster) -> CachefsFileSystem:
    return fsspec.filesystem("cachefs", master=cluster[0].address)


def test_the_protocol_is_found_through_its_entry_point(cluster, tmp_path):
    code = (
        "import sys, fsspec\n"
        "fs = fsspec.filesystem('cachefs', master=sys.argv[1])\n"
        "assert type(fs).__module__ == 'cachefs.fsspec', type(fs)\n"
        "print(fsspec.open('cachefs://frames/images/a/x.jpg', master=sys.argv[1]).open().read(5))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, cluster[0].address], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(cluster[2]["images/a/x.jpg"][:5])


def test_cat_file_every_byte_and_ranges(cluster, fs):
    files = cluster[2]
    for rel, data in files.items():
        assert fs.cat_file(f"{NAME}/{rel}") == data, rel
    assert fs.cat(f"cachefs://{NAME}/top.jpg") == files["top.jpg"]
    big, edge = files["big.bin"], BLOCK_SIZE - 7
    ranges = [(edge, edge + 20), (None, 10), (-10, None), (5, -5), (edge, None),
              (BLOCK_SIZE, 2 * BLOCK_SIZE + 3), (len(big) + 5, None), (30, 10)]  # fmt: skip
    for start, end in ranges:
        assert fs.cat_file(f"{NAME}/big.bin", start, end) == big[start:end], (start, end)
    assert fs.cat_ranges([f"{NAME}/big.bin"] * 2, [0, edge], [10, edge + 10]) == [
        big[:10], big[edge : edge + 10]]  # fmt: skip


def test_open_read_seek_tell(cluster, fs):
    big, edge = cluster[2]["big.bin"], BLOCK_SIZE - 7
    with fs.open(f"cachefs://{NAME}/big.bin") as f:
        assert f.readable() and f.seekable() and not f.writable()
        assert f.size == len(big)
        assert f.read(100) == big[:100] and f.tell() == 100
        assert f.seek(edge) == edge
        assert f.read(30) == big[edge : edge + 30] and f.tell() == edge + 30
        assert f.seek(-10, io.SEEK_END) == len(big) - 10
        assert f.read() == big[-10:] and f.read() == b""
        f.seek(5)
        f.seek(10, io.SEEK_CUR)
        buffer = bytearray(50)
        assert f.readinto(buffer) == 50 and bytes(buffer) == big[15:65]
        f.seek(0)
        assert f.read() == big
    assert f.closed
    with fs.open(f"{NAME}/images/a/notes.txt", "r") as text:
        assert text.read() == "not an image"
    assert fs.open(f"{NAME}/c000/v00000/f0.bin").read() == cluster[2]["c000/v00000/f0.bin"]


def test_ls_and_info_match_the_source(cluster, fs):
    src = cluster[1]
    top = sorted(p.name for p in src.iterdir())
    assert fs.ls(NAME, detail=False) == [f"{NAME}/{name}" for name in top]
    assert fs.ls(f"cachefs://{NAME}/", detail=False) == fs.ls(NAME, detail=False)
    for entry in fs.ls(f"{NAME}/images/a", detail=True):
        path = src / entry["name"].removeprefix(f"{NAME}/")
        assert entry["type"] == ("directory" if path.is_dir() else "file"), entry
        assert entry["size"] == (0 if path.is_dir() else path.stat().st_size), entry
        assert int(entry["mtime"]) == int(path.stat().st_mtime), entry
    assert NAME in fs.ls("", detail=False) and NAME in fs.ls("/", detail=False)
    assert {"name": NAME, "size": 0, "type": "directory"} in fs.ls("")
    info = fs.info(f"{NAME}/big.bin")
    assert (info["name"], info["type"], info["size"]) == (f"{NAME}/big.bin", "file",
                                                          len(cluster[2]["big.bin"]))  # fmt: skip
    assert fs.info(NAME)["type"] == "directory" and fs.info(f"{NAME}/images")["type"] == "directory"
    assert fs.ls(f"{NAME}/top.jpg") == [fs.info(f"{NAME}/top.jpg")]
    assert fs.isdir(f"{NAME}/images") and fs.isfile(f"{NAME}/top.jpg") and fs.isdir("")
    assert fs.size(f"{NAME}/top.jpg") == len(cluster[2]["top.jpg"])
    assert int(fs.modified(f"{NAME}/top.jpg").timestamp()) == int((src / "top.jpg").stat().st_mtime)


def test_find_walk_and_glob(cluster, fs):
    src, files = cluster[1], cluster[2]
    assert fs.find(NAME) == sorted(f"{NAME}/{rel}" for rel in files)
    detail = fs.find(f"{NAME}/images", detail=True)
    assert {k: v["size"] for k, v in detail.items()} == {
        f"{NAME}/{rel}": len(data) for rel, data in files.items() if rel.startswith("images/")
    }
    dirs = fs.find(f"{NAME}/images", withdirs=True)
    assert {f"{NAME}/images", f"{NAME}/images/a", f"{NAME}/images/b/c"} <= set(dirs)
    assert fs.find(NAME, maxdepth=1) == sorted(
        f"{NAME}/{p.name}" for p in src.iterdir() if p.is_file()
    )
    walked = {d: (sorted(ds), sorted(fn)) for d, ds, fn in fs.walk(f"{NAME}/images")}
    expected = {f"{NAME}/{os.path.relpath(d, src)}": (sorted(ds), sorted(fn))
                for d, ds, fn in os.walk(src / "images")}  # fmt: skip
    assert walked == expected
    jpgs = sorted(f"{NAME}/{rel}" for rel in files if rel.endswith(".jpg"))
    assert fs.glob(f"{NAME}/**/*.jpg") == jpgs
    assert fs.glob(f"cachefs://{NAME}/images/*/*.jpg") == [
        f"{NAME}/images/a/x.jpg", f"{NAME}/images/a/y.jpg"]  # fmt: skip
    assert fs.glob(f"{NAME}/c000/v0000[01]/f?.bin") == sorted(
        f"{NAME}/{rel}" for rel in files if rel.startswith(("c000/v00000/", "c000/v00001/"))
    )
    assert fs.du(f"{NAME}/tables") == sum(
        len(d) for r, d in files.items() if r.startswith("tables")
    )


def test_pyarrow_reads_parquet_through_the_filesystem(cluster, fs):
    got = pads.dataset(f"{NAME}/table.parquet", filesystem=fs, format="parquet").to_table()
    assert got.equals(table(0, 5000))
    got = pads.dataset(f"{NAME}/tables", filesystem=fs, format="parquet").to_table()
    assert got.sort_by("id").equals(table(0, 300))
    filtered = pq.read_table(f"{NAME}/table.parquet", filesystem=fs, columns=["id"],
                             filters=[("id", ">=", 4990)])  # fmt: skip
    assert filtered.column("id").to_pylist() == list(range(4990, 5000))


def test_missing_paths_and_escapes(cluster, fs):
    for path in [f"{NAME}/nope.bin", f"{NAME}/images/nope/x.jpg", "no-such-dataset/x",
                 "no-such-dataset"]:  # fmt: skip
        with pytest.raises(FileNotFoundError):
            fs.info(path)
        with pytest.raises(FileNotFoundError):
            fs.ls(path)
        with pytest.raises(FileNotFoundError):
            fs.cat_file(path)
        with pytest.raises(FileNotFoundError):
            fs.open(path)
        assert not fs.exists(path)
    for path in [f"{NAME}/../{NAME}/top.jpg", f"{NAME}/images/../top.jpg", "../x", "./frames",
                 f"{NAME}/./top.jpg"]:  # fmt: skip
        for call in (fs.info, fs.ls, fs.cat_file, fs.open):
            with pytest.raises(ValueError):
                call(path)
        assert not fs.exists(path)
    with pytest.raises(IsADirectoryError):
        fs.open(f"{NAME}/images")
    with pytest.raises(IsADirectoryError):
        fs.cat_file(f"{NAME}/images")


def test_writes_are_refused(cluster, fs, tmp_path):
    local = tmp_path / "local.bin"
    local.write_bytes(b"x")
    target = f"{NAME}/new.bin"
    writes = [
        lambda: fs.open(target, "wb"),
        lambda: fs.open(f"{NAME}/top.jpg", "ab"),
        lambda: fs.open(target, "w"),
        lambda: fs.open(target, "xb"),
        lambda: fs.pipe_file(target, b"x"),
        lambda: fs.pipe(target, b"x"),
        lambda: fs.write_bytes(target, b"x"),
        lambda: fs.write_text(target, "x"),
        lambda: fs.put_file(str(local), target),
        lambda: fs.put(str(local), target),
        lambda: fs.touch(target),
        lambda: fs.mkdir(f"{NAME}/newdir"),
        lambda: fs.makedirs(f"{NAME}/newdir/sub", exist_ok=True),
        lambda: fs.rmdir(f"{NAME}/images/b/c"),
        lambda: fs.rm(f"{NAME}/top.jpg"),
        lambda: fs.rm(f"{NAME}/images", recursive=True),
        lambda: fs.rm_file(f"{NAME}/top.jpg"),
        lambda: fs.cp_file(f"{NAME}/top.jpg", target),
        lambda: fs.copy(f"{NAME}/top.jpg", target),
        lambda: fs.mv(f"{NAME}/top.jpg", target),
        lambda: fs.get_mapper(f"{NAME}/m").__setitem__("k", b"v"),
    ]
    for i, write in enumerate(writes):
        with pytest.raises(PermissionError) as exc:
            write()
        assert exc.value.errno == errno.EROFS and "read-only" in str(exc.value), i
    assert sorted(p.relative_to(cluster[1]).as_posix() for p in cluster[1].rglob("*")
                  if p.is_file()) == sorted(cluster[2])  # fmt: skip
    assert fs.cat_file(f"{NAME}/top.jpg") == cluster[2]["top.jpg"]


def test_instances_per_master_and_one_client_per_cluster(cluster, tmp_path):
    address, files = cluster[0].address, cluster[2]
    fs = fsspec.filesystem("cachefs", master=address)
    assert fsspec.filesystem("cachefs", master=address) is fs
    secret = str(tmp_path / "secret")
    with open(secret, "wb") as f:
        f.write(cluster[0].secret)
    os.chmod(secret, 0o600)
    with_secret = fsspec.filesystem("cachefs", master=address, secret_file=secret)
    assert with_secret is not fs and with_secret.cat_file(f"{NAME}/top.jpg") == files["top.jpg"]
    other = master_process(tmp_path)
    other.start()
    try:
        (tmp_path / "other-src").mkdir()
        (tmp_path / "other-src" / "only-here.txt").write_text("other cluster")
        result = run_cli("dataset", "add", "other", f"file://{tmp_path / 'other-src'}",
                         "--master", other.address)  # fmt: skip
        assert result.returncode == 0, result.stderr
        fs2 = fsspec.filesystem("cachefs", master=other.address)
        assert fs2 is not fs and fs2.client is not fs.client
        assert fs2.ls("", detail=False) == ["other"] and NAME in fs.ls("", detail=False)
        assert fs2.ls("other", detail=False) == ["other/only-here.txt"]
        with pytest.raises(FileNotFoundError):
            fs2.info(f"{NAME}/top.jpg")
    finally:
        other.stop()
    # fsspec keeps an instance per thread; they all share the cluster's one Client.
    rels = sorted(files)

    def read(rel: str) -> tuple[bytes, object]:
        mine = fsspec.filesystem("cachefs", master=address)
        return mine.cat_file(f"{NAME}/{rel}"), mine.client

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, rels))
    assert [data for data, _ in results] == [files[rel] for rel in rels]
    assert {id(client) for _, client in results} == {id(fs.client)}
    assert pickle.loads(pickle.dumps(fs)).cat_file(f"{NAME}/top.jpg") == files["top.jpg"]


def test_a_forked_child_reads_through_inherited_and_new_filesystems(cluster, fs):
    address, files = cluster[0].address, cluster[2]
    assert fs.cat_file(f"{NAME}/top.jpg") == files["top.jpg"]  # the parent's loop exists
    pid = os.fork()
    if pid == 0:  # the child: exit status says what it saw
        try:
            ok = all(fs.cat_file(f"{NAME}/{rel}") == data for rel, data in files.items())
            fresh = fsspec.filesystem("cachefs", master=address)
            ok = (
                ok
                and fresh is not fs
                and fresh.glob(f"{NAME}/**/*.jpg") == fs.glob(f"{NAME}/**/*.jpg")
            )
            with fresh.open(f"{NAME}/big.bin") as f:
                f.seek(BLOCK_SIZE)
                ok = ok and f.read(10) == files["big.bin"][BLOCK_SIZE : BLOCK_SIZE + 10]
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(fs.cat_file(f"{NAME}/{rel}") == data for rel, data in files.items())
