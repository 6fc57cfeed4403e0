"""A file:// dataset's root is a jail, and its files keep their permission bits (issue #12).

Real parts: `cachefs mount` (embedded and cluster mode), master and worker processes, user
`nobody` via runuser. Mount points and sources that `nobody` must reach live in a fresh
0755 directory under /tmp (pytest's own tmp dirs are 0700).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import trio

from cachefs.config import parse_address
from cachefs.credentials import client_secret
from cachefs.errors import CacheFsError, InvalidArgument, NotFound, StaleVersion
from cachefs.master.namespace import MetadataStore
from cachefs.meta import Attr
from cachefs.rpc import RpcClient
from cachefs.ufs import RemoteEntry
from tests.fuse.conftest import mounts_under
from tests.procs import master_process, run_cli, worker_process
from tests.unprivileged import NOBODY

ESCAPES = {"shadowlink": "/etc/shadow", "uplink": "../outside", "dirlink": "../outdir"}
INSIDE = {"inside.txt": b"inside\n", "sibling": b"inside\n", "sub/up_in": b"inside\n"}


@pytest.fixture
def public():
    """A fresh directory every user can traverse; removed at the end."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="cachefs-jail-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def public_mounts(public):
    with mounts_under(public) as m:
        yield m


def make_source(base: Path) -> Path:
    """base/src, the dataset: files, links that stay inside, links out to base/outside,
    base/outdir/file and /etc/shadow."""
    (base / "outside").write_bytes(b"SECRET outside\n")
    (base / "outdir").mkdir()
    (base / "outdir" / "file").write_bytes(b"SECRET in outdir\n")
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "inside.txt").write_bytes(INSIDE["inside.txt"])
    os.symlink("inside.txt", src / "sibling")
    os.symlink("../inside.txt", src / "sub" / "up_in")
    for name, target in ESCAPES.items():
        os.symlink(target, src / name)
    for path in (base, src, src / "sub"):
        path.chmod(0o755)
    (src / "inside.txt").chmod(0o644)
    return src


def listing(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add((Path(dirpath) / name).relative_to(root).as_posix())
    return out


def errno_of(action) -> int | None:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


def test_links_out_of_the_root_are_invisible_through_a_mount(public_mounts, public):
    src = make_source(public)
    mnt = public_mounts.embedded(src.as_uri())
    assert listing(mnt) == {"inside.txt", "sibling", "sub", "sub/up_in"}
    for rel in ("shadowlink", "uplink", "dirlink", "dirlink/file"):
        assert errno_of(lambda rel=rel: (mnt / rel).read_bytes()) == errno.ENOENT, rel
        assert errno_of(lambda rel=rel: os.lstat(mnt / rel)) == errno.ENOENT, rel
    for rel, data in INSIDE.items():
        assert (mnt / rel).read_bytes() == data


async def _namespace_and_worker_reads(master: str, src: Path) -> None:
    secret = client_secret(None, parse_address(master))
    async with RpcClient(master, secret=secret) as m:
        root = Attr.from_wire(await m.call("root", dataset="j"))
        page = await m.call("readdir", dataset="j", ino=root.ino)
        assert sorted(name for name, _ in page["entries"]) == ["inside.txt", "sibling", "sub"]
        for rel in ("shadowlink", "uplink", "dirlink", "dirlink/file"):
            with pytest.raises(NotFound):
                await m.call("lookup_path", dataset="j", path=rel)
        (worker,) = (await m.call("workers"))["workers"]
    async with RpcClient(worker["address"], secret=secret) as w:

        async def read(path: str, target: Path):
            st = os.stat(target)  # the real target's version, so only the jail can refuse
            return await w.call_with_payload(
                "read", dataset="j", path=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                offset=0, length=st.st_size,
            )  # fmt: skip

        # Out of the root is missing, and a read of a missing file fails as a stale version
        # (a file removed since the sync); a ".." is refused before any file system call.
        missing = (NotFound, StaleVersion)
        forged = {
            "shadowlink": (Path("/etc/shadow"), missing),
            "dirlink/file": (src.parent / "outdir" / "file", missing),
            "uplink": (src.parent / "outside", missing),
            "../outside": (src.parent / "outside", InvalidArgument),
        }
        for path, (target, error) in forged.items():
            with pytest.raises(CacheFsError) as info:
                await read(path, target)
            assert isinstance(info.value, error), (path, info.value)
            assert "SECRET" not in str(info.value)
        _, data = await read("sibling", src / "inside.txt")
        assert data == INSIDE["sibling"]


def test_master_and_worker_refuse_paths_out_of_the_root(tmp_path, public):
    src = make_source(public)
    master = master_process(tmp_path)
    address = master.start()
    worker = worker_process(tmp_path, address, "w1", "64M")
    try:
        worker.start()
        added = run_cli("dataset", "add", "j", src.as_uri(), "--master", address)
        assert added.returncode == 0, added.stderr
        trio.run(_namespace_and_worker_reads, address, src)
    finally:
        worker.stop()
        master.stop()
    assert "SECRET" not in worker.log() + master.log()


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, timeout=30
    )


def make_owned_source(base: Path) -> Path:
    src = base / "src"
    (src / "closed").mkdir(parents=True)
    files = {
        "private.txt": (0o600, 0, 0),
        "public.txt": (0o644, 0, 0),
        "nobodys.txt": (0o600, NOBODY.pw_uid, NOBODY.pw_gid),
        "closed/inner.txt": (0o644, 0, 0),
    }
    for rel, (mode, uid, gid) in files.items():
        (src / rel).write_text(f"{rel}\n")
        os.chown(src / rel, uid, gid)
        (src / rel).chmod(mode)
    src.chmod(0o755)
    (src / "closed").chmod(0o700)
    return src


def test_permission_bits_and_owners_are_the_sources(public_mounts, public):
    src = make_owned_source(public)
    mnt = public_mounts.embedded(src.as_uri(), "--allow-other")
    for rel in ("private.txt", "public.txt", "nobodys.txt", "closed", "closed/inner.txt"):
        seen, real = os.stat(mnt / rel), os.stat(src / rel)
        assert (seen.st_mode, seen.st_uid, seen.st_gid) == (
            real.st_mode,
            real.st_uid,
            real.st_gid,
        ), rel
    assert stat.S_IMODE(os.stat(mnt / "private.txt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mnt / "public.txt").st_mode) == 0o644

    # The kernel enforces them for other users: nobody reads only what the source allows.
    denied = as_nobody("cat", str(mnt / "private.txt"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert as_nobody("cat", str(mnt / "public.txt")).stdout == "public.txt\n"
    assert as_nobody("cat", str(mnt / "nobodys.txt")).stdout == "nobodys.txt\n"
    closed = as_nobody("cat", str(mnt / "closed" / "inner.txt"))
    assert closed.returncode != 0 and "Permission denied" in closed.stderr, closed
    assert (mnt / "private.txt").read_text() == "private.txt\n"  # root still reads it


def test_a_chmod_reaches_a_mount_at_the_next_sync(public, mounts, tmp_path):
    src = make_owned_source(public)
    master = master_process(tmp_path)
    address = master.start()
    worker = worker_process(tmp_path, address, "w1", "64M")
    try:
        worker.start()
        assert run_cli("dataset", "add", "p", src.as_uri(), "--master", address).returncode == 0
        mnt = public / "mnt"
        mnt.mkdir()
        mounts.mountpoints.append(mnt)  # unmounted by the fixture, even on failure
        mounted = run_cli("mount", "p", str(mnt), "--master", address, "--allow-other")
        assert mounted.returncode == 0, mounted.stderr
        assert as_nobody("cat", str(mnt / "public.txt")).returncode == 0
        assert as_nobody("cat", str(mnt / "closed" / "inner.txt")).returncode != 0

        (src / "public.txt").chmod(0o600)
        (src / "closed").chmod(0o755)  # a directory keeps its inode: its entry is invalidated
        os.chown(src / "private.txt", NOBODY.pw_uid, NOBODY.pw_gid)
        synced = run_cli("dataset", "sync", "p", "--master", address)
        assert "changed 2" in synced.stdout, synced.stdout

        def seen():
            return (
                stat.S_IMODE(os.stat(mnt / "public.txt").st_mode),
                os.stat(mnt / "private.txt").st_uid,
                stat.S_IMODE(os.stat(mnt / "closed").st_mode),
            )

        expected = (0o600, NOBODY.pw_uid, 0o755)
        deadline = time.monotonic() + 30
        while seen() != expected and time.monotonic() < deadline:  # mounts poll every 2 s
            time.sleep(0.2)
        assert seen() == expected
        assert as_nobody("cat", str(mnt / "public.txt")).returncode != 0
        assert as_nobody("cat", str(mnt / "private.txt")).stdout == "private.txt\n"
        assert as_nobody("cat", str(mnt / "closed" / "inner.txt")).stdout == "closed/inner.txt\n"
    finally:
        mounts.cleanup()
        worker.stop()
        master.stop()


def test_records_without_modes_load_and_a_mode_change_is_a_new_version(tmp_path):
    # Records of older versions have no mode/uid/gid: the same as an entry written without.
    store = MetadataStore(tmp_path / "meta")
    try:
        store.add_dataset("d", "file:///x", {})

        def sync(*entries):
            run = store.begin_sync("d")
            run.apply(list(entries))
            return run.finish()

        sync(RemoteEntry("dir", True, 0, 5), RemoteEntry("dir/f", False, 3, 7))
        old_file, old_dir = store.lookup_path("d", "dir/f"), store.lookup_path("d", "dir")
        assert (old_file.mode, old_file.uid, old_file.gid) == (None, None, None)

        report = sync(
            RemoteEntry("dir", True, 0, 5, None, 0o700, 0, 0),
            RemoteEntry("dir/f", False, 3, 7, None, 0o600, 1000, 1000),
        )
        assert (report.changed, report.added, report.removed) == (1, 0, 0)
        new_file, new_dir = store.lookup_path("d", "dir/f"), store.lookup_path("d", "dir")
        assert (new_file.mode, new_file.uid, new_file.gid) == (0o600, 1000, 1000)
        assert new_file.ino != old_file.ino and new_file.version == old_file.version + 1
        assert new_dir.ino == old_dir.ino and new_dir.mode == 0o700  # children hang off it
        logged = {(name, ino) for _, name, ino in store.changes_since("d", 1)["changes"]}
        assert logged == {("f", old_file.ino), ("dir", old_dir.ino)}

        unchanged = sync(
            RemoteEntry("dir", True, 0, 5, None, 0o700, 0, 0),
            RemoteEntry("dir/f", False, 3, 7, None, 0o600, 1000, 1000),
        )
        assert unchanged.changed == 0
        assert store.lookup_path("d", "dir/f") == new_file
        assert store.changes_since("d", 2)["changes"] == []
    finally:
        store.close()
