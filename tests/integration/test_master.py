"""A real master process on a free port, driven through the CLI and over RPC."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import trio

from cachefs.config import parse_address
from cachefs.meta import Attr
from cachefs.rpc import RpcClient
from tests.procs import master_process, run_cli, worker_process


@pytest.fixture
def master(tmp_path):
    proc = master_process(tmp_path)
    proc.start()
    yield proc
    proc.stop()


def cli(master, *args):
    return run_cli(*args, "--master", master.address)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def sample_files(n_dirs=20, per_dir=10) -> dict[str, bytes]:
    return {
        f"video_{d:03d}/img_{f:05d}.jpg": os.urandom(100 + 37 * (d * per_dir + f))
        for d in range(n_dirs)
        for f in range(per_dir)
    }


async def walk_master(client: RpcClient, dataset: str, page: int = 7) -> dict[str, Attr]:
    """Every entry below the root as path -> Attr, using paged readdir (small pages on purpose)."""
    root = Attr.from_wire(await client.call("root", dataset=dataset))
    found: dict[str, Attr] = {}
    stack = [("", root.ino)]
    while stack:
        base, ino = stack.pop()
        after = None
        while True:
            reply = await client.call("readdir", dataset=dataset, ino=ino, after=after, limit=page)
            for name, wire in reply["entries"]:
                attr = Attr.from_wire(wire)
                path = f"{base}/{name}" if base else name
                found[path] = attr
                if attr.is_dir:
                    stack.append((path, attr.ino))
            if not reply["more"]:
                break
            after = reply["entries"][-1][0]
    return found


def local_listing(root: Path) -> dict[str, tuple[bool, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            rel = path.relative_to(root).as_posix()
            out[rel] = (path.is_dir(), 0 if path.is_dir() else st.st_size, st.st_mtime_ns)
    return out


async def test_sync_local_directory_matches_source(master, tmp_path):
    source = tmp_path / "source"
    write_tree(source, sample_files())
    (source / "empty_dir").mkdir()
    result = cli(master, "dataset", "add", "frames", source.as_uri())
    assert result.returncode == 0, result.stderr
    assert "200 files" in result.stdout

    async with RpcClient(parse_address(master.address), secret=master.secret) as client:
        found = await walk_master(client, "frames")
        expected = local_listing(source)
        assert set(found) == set(expected)
        for path, (is_dir, size, mtime_ns) in expected.items():
            attr = found[path]
            assert attr.is_dir == is_dir, path
            if not is_dir:
                assert (attr.size, attr.mtime_ns) == (size, mtime_ns), path
        # lookups agree with the listing; inode ids are unique
        assert len({a.ino for a in found.values()}) == len(found)
        attr = Attr.from_wire(
            await client.call("lookup_path", dataset="frames", path="video_003/img_00001.jpg")
        )
        assert attr == found["video_003/img_00001.jpg"]
        assert await client.call("path_of", dataset="frames", ino=attr.ino) == (
            "video_003/img_00001.jpg"
        )
        stats = await client.call("statfs", dataset="frames")
        assert stats["files"] == 200
        assert stats["bytes"] == sum(size for d, size, _ in expected.values() if not d)

    listing = cli(master, "dataset", "ls")
    assert listing.returncode == 0 and "frames" in listing.stdout
    status = json.loads(cli(master, "status", "--json").stdout)
    assert [d["name"] for d in status["datasets"]] == ["frames"]
    assert status["datasets"][0]["files"] == 200


async def test_sync_s3_bucket_matches_source(master, moto_server):
    files = sample_files(n_dirs=8, per_dir=10)
    files["top-level.bin"] = b"x" * 5000
    moto_server.create_bucket("train")
    moto_server.upload("train", {f"sets/a/{k}": v for k, v in files.items()})
    moto_server.upload("train", {"elsewhere/ignored.bin": b"nope"})

    result = cli(
        master,
        "dataset",
        "add",
        "s3set",
        "s3://train/sets/a",
        *[f"-o{k}={v}" for k, v in moto_server.options.items()],
    )
    assert result.returncode == 0, result.stderr
    remote_mtimes = moto_server.mtimes("train", "sets/a/")

    async with RpcClient(parse_address(master.address), secret=master.secret) as client:
        found = await walk_master(client, "s3set")
    found_files = {p: a for p, a in found.items() if not a.is_dir}
    assert set(found_files) == set(files)
    for path, data in files.items():
        assert found_files[path].size == len(data)
        assert found_files[path].mtime_ns // 10**9 == remote_mtimes[path] // 10**9
    # directories are implied by the keys
    assert {p for p, a in found.items() if a.is_dir} == {f"video_{d:03d}" for d in range(8)}


async def test_restart_keeps_ids_and_resync_counts_changes(master, tmp_path):
    source = tmp_path / "source"
    files = sample_files(n_dirs=5, per_dir=10)
    write_tree(source, files)
    assert cli(master, "dataset", "add", "ds", source.as_uri()).returncode == 0
    async with RpcClient(parse_address(master.address), secret=master.secret) as client:
        before = await walk_master(client, "ds")

    master.stop()
    master.start()
    async with RpcClient(parse_address(master.address), secret=master.secret) as client:
        after_restart = await walk_master(client, "ds")
    assert after_restart == before

    changed = ["video_000/img_00000.jpg", "video_001/img_00001.jpg", "video_004/img_00009.jpg"]
    removed = ["video_002/img_00000.jpg", "video_003/img_00005.jpg"]
    future = time.time() + 100  # a distinct mtime even on coarse clocks
    for rel in changed:
        (source / rel).write_bytes(b"new content " + rel.encode())
        os.utime(source / rel, (future, future))
    for rel in removed:
        (source / rel).unlink()

    result = cli(master, "dataset", "sync", "ds")
    assert result.returncode == 0, result.stderr
    assert "added 0, changed 3, removed 2" in result.stdout

    async with RpcClient(parse_address(master.address), secret=master.secret) as client:
        after_sync = await walk_master(client, "ds")
    assert set(after_sync) == set(before) - set(removed)
    for path, attr in after_sync.items():
        if path in changed:  # a new version is a new inode (as a replace by rename)
            assert attr.version == before[path].version + 1
            assert attr.ino not in {a.ino for a in before.values()}
            assert attr.size == len(b"new content " + path.encode())
        else:
            assert attr.ino == before[path].ino, path  # stable inode ids
            if not attr.is_dir:
                assert attr == before[path]

    # a sync with nothing changed reports nothing
    again = cli(master, "dataset", "sync", "ds")
    assert "added 0, changed 0, removed 0" in again.stdout


async def test_remove_dataset_and_reuse_name(master, tmp_path):
    source = tmp_path / "src"
    write_tree(source, {"a/b.txt": b"hello"})
    assert cli(master, "dataset", "add", "x", source.as_uri()).returncode == 0
    assert cli(master, "dataset", "rm", "x").returncode == 0
    gone = cli(master, "status", "x")
    assert gone.returncode == 1 and "unknown dataset 'x'" in gone.stderr
    assert cli(master, "dataset", "add", "x", source.as_uri()).returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["dataset", "add", "bad", "ftp://host/path"], 2, "unsupported scheme"),
        (["dataset", "add", "bad", "file://relative/path"], 2, "absolute"),
        (["dataset", "add", "bad", "file:///definitely/not/here"], 1, "does not exist"),
        (["dataset", "sync", "nosuch"], 1, "unknown dataset 'nosuch'"),
        (["dataset", "rm", "nosuch"], 1, "unknown dataset 'nosuch'"),
        (["dataset", "add", "bad", "file:///tmp", "-o", "novalue"], 2, "KEY=VALUE"),
    ],
)
def test_bad_input_gets_one_line_error(master, args, code, message):
    result = cli(master, *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stderr.startswith("cachefs: error:") and result.stderr.count("\n") == 1


def test_duplicate_dataset_name(master, tmp_path):
    assert cli(master, "dataset", "add", "dup", tmp_path.as_uri()).returncode == 0
    result = cli(master, "dataset", "add", "dup", tmp_path.as_uri())
    assert result.returncode == 1
    assert "dataset 'dup' already exists" in result.stderr


def test_unreachable_s3_endpoint(master):
    started = time.monotonic()
    result = cli(
        master,
        "dataset",
        "add",
        "far",
        "s3://bucket/prefix",
        "-o",
        "endpoint_override=127.0.0.1:1",
        "-o",
        "scheme=http",
    )
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr and result.stderr.count("\n") == 1
    assert time.monotonic() - started < 60


def test_nonexistent_s3_prefix(master, moto_server):
    moto_server.create_bucket("emptyish")
    result = cli(
        master,
        "dataset",
        "add",
        "nothing",
        "s3://emptyish/no/such/prefix",
        *[f"-o{k}={v}" for k, v in moto_server.options.items()],
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_unreachable_master(tmp_path):
    result = run_cli("dataset", "ls", "--master", "127.0.0.1:1")
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr and result.stderr.count("\n") == 1


def test_shared_secret_end_to_end(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    wrong = tmp_path / "wrong"
    wrong.write_text("a different secret entirely\n")
    wrong.chmod(0o600)
    elsewhere = tmp_path / "other-runtime"  # the runtime dir of another user or host
    elsewhere.mkdir(mode=0o700)
    master = master_process(tmp_path, "--secret-file", str(secret))
    master.start()
    try:
        ok = run_cli("dataset", "ls", "--master", master.address, "--secret-file", str(secret))
        assert ok.returncode == 0, ok.stderr
        # the same user on the master's host finds the secret the master published
        assert run_cli("dataset", "ls", "--master", master.address).returncode == 0
        for args, env in (
            ([], {"XDG_RUNTIME_DIR": str(elsewhere)}),
            (["--secret-file", str(wrong)], {}),
        ):
            denied = run_cli("dataset", "ls", "--master", master.address, *args, env=env)
            assert denied.returncode == 1 and denied.stderr.count("\n") == 1
            assert "auth" in denied.stderr.lower() or "secret" in denied.stderr.lower()
        secret.chmod(0o644)
        loose = run_cli("dataset", "ls", "--master", master.address, "--secret-file", str(secret))
        assert loose.returncode == 2 and "chmod 600" in loose.stderr
    finally:
        master.stop()


def test_restarted_master_still_lists_its_workers(tmp_path):
    master = master_process(tmp_path)
    master.start()
    worker = worker_process(tmp_path, master.address, "w1", "64M")
    try:
        worker.start()
        master.stop(sig=9)
        master.start()  # at once: before the worker's next heartbeat

        async def members():
            async with RpcClient(parse_address(master.address), secret=master.secret) as client:
                return await client.call("workers")

        assert [w["address"] for w in trio.run(members)["workers"]] == [worker.address]
    finally:
        worker.stop()
        master.stop()
