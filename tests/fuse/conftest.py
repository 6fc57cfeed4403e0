"""Real FUSE mounts for tests: `cachefs mount` as users run it; every mount is unmounted at the
end of its test, even a failed one, and its process is gone."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefs.worker.ramtier import reclaim
from tests.procs import run_cli, running_cluster

SHM = Path("/dev/shm")


class Mounts:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.mountpoints: list[Path] = []
        self.shm_dirs: set[Path] = set()
        self.keep_cache = False  # a mount asked to keep its tiers: leftovers are no leak

    def mount(self, source: str, *args: str, name: str = "mnt", check: bool = True):
        mountpoint = self.tmp_path / name
        mountpoint.mkdir(exist_ok=True)
        self.keep_cache |= "--keep-cache" in args
        result = run_cli("mount", source, str(mountpoint), *args, timeout=300)
        if check:
            assert result.returncode == 0, result.stderr
        self.mountpoints.append(mountpoint)
        return mountpoint if check else result

    def embedded(self, uri: str, *args: str, name: str = "mnt") -> Path:
        state = self.tmp_path / f"state-{name}"
        with self.tracking_tiers():
            return self.mount(uri, "--state", str(state), "--mem", "256M", *args, name=name)

    @contextlib.contextmanager
    def tracking_tiers(self) -> Iterator[None]:
        """RAM tiers made inside the block are checked at cleanup, once every mount is gone: an
        embedded mount removes its own at umount (unless --keep-cache), so one left behind
        that no live process owns fails the test (a leak), and is removed either way, or a
        run fills /dev/shm."""
        before = set(SHM.glob("cachefs-*"))
        try:
            yield
        finally:
            self.shm_dirs |= set(SHM.glob("cachefs-*")) - before

    def cleanup(self) -> None:
        for mountpoint in self.mountpoints:
            if os.path.ismount(mountpoint):
                result = run_cli("umount", str(mountpoint))
                if os.path.ismount(mountpoint):  # last resort, so later tests are not affected
                    subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
                    raise AssertionError(f"umount failed: {result.stderr}")
        leaked = []
        for path in sorted(self.shm_dirs):
            orphan = reclaim(path, dry_run=True)  # None: gone; (False, _): a live owner's
            if orphan is not None and orphan[0]:
                leaked.append(path.name)
                shutil.rmtree(path, ignore_errors=True)
        if leaked and not self.keep_cache:
            raise AssertionError(f"RAM tiers left in {SHM} after umount: {leaked}")


@contextlib.contextmanager
def mounts_under(base: Path) -> Iterator[Mounts]:
    """Mounts whose mountpoints and states live under `base`, all cleaned up at the end."""
    m = Mounts(base)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def mounts(tmp_path):
    with mounts_under(tmp_path) as m:
        yield m


def make_files(root: Path, count: int, *, max_size: int = 16_384, seed: int = 1) -> dict:
    """`count` files in directories of 10, random sizes (some empty); returns rel -> sha256."""
    rng = random.Random(seed)
    digests = {}
    for i in range(count):
        rel = f"c{i // 1000:03d}/v{i // 10:05d}/f{i % 10}.bin"
        data = rng.randbytes(rng.randrange(max_size) if i % 97 else 0)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def tree_listing(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry below root: rel -> (is_dir, size, mtime in whole seconds)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            is_dir = path.is_dir()
            out[path.relative_to(root).as_posix()] = (
                is_dir,
                0 if is_dir else st.st_size,
                int(st.st_mtime),
            )
    return out


def read_all(root: Path, rels, threads: int = 8) -> dict[str, str]:
    """sha256 of every file, read by `threads` threads (errors propagate)."""

    def one(rel):
        with open(root / rel, "rb") as f:
            return rel, hashlib.sha256(f.read()).hexdigest()

    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, list(rels)))


@pytest.fixture
def cluster(tmp_path):
    """A master and two workers as processes; yields (master, workers)."""
    with running_cluster(tmp_path, mem="128M") as (master, workers):
        yield master, workers
