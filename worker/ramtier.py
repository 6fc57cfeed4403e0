"""RAM tiers in /dev/shm: who owns one, the share of /dev/shm they may take, giving them back.

A RAM tier is the directory SHM/cachefs-<worker id>/ holding `mem.slab` and `owner`:

- **Owner**: the process holding an exclusive flock on `owner` (its pid and start time are
  written there, for messages only). A worker or an embedded mount takes it before it opens the
  slab and holds it until it exits; the kernel drops it when the process dies, SIGKILL
  included. So whether a running process owns a tier is a fact the kernel keeps, not a guess
  from pids that may have been reused.
- **Orphan**: a tier whose lock nobody holds and whose slab no process maps (`/proc/*/maps`:
  an older cachefs without the lock, or a short-circuit reader of a dead worker, may still
  use it; removing its file would give no RAM back). `cachefs gc` removes orphans; a worker
  at start removes its own previous tier if this run will not use it (another --shm, --mem 0).
- **Removing** happens under the lock (gc takes it as a worker would): files first, the lock
  file last, then the directory. A worker that starts meanwhile finds its lock file gone
  and starts over, so it never writes into a tier being removed.
- **Share**: all cachefs RAM tiers of one shm directory take at most `share` % of its
  filesystem together (default 50) and a new tier must fit in the free space; otherwise a
  start is refused before it creates anything there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cachefs.errors import AlreadyExists, InvalidArgument, NoSpace
from cachefs.runtime import _start_time, private_dir

log = logging.getLogger("cachefs.worker.ramtier")

PREFIX = "cachefs-"
SLAB = "mem.slab"
LOCK = "owner"
#: Percent of the shm filesystem all RAM tiers may take together (`--shm-share`).
DEFAULT_SHARE = 50
#: How long a start waits for a lock held by someone else (gc holds one for milliseconds).
LOCK_WAIT = 2.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def tier_dir(shm_dir: Path, worker_id: str) -> Path:
    return shm_dir / f"{PREFIX}{worker_id}"


def human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class TierLock:
    """The held lock of one tier directory (and an fd of that directory)."""

    def __init__(self, path: Path, dir_fd: int, fd: int):
        self.path, self._dir_fd, self._fd = path, dir_fd, fd

    def write_owner(self) -> None:
        record = json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, record, 0)

    def release(self) -> None:
        """Closing the fd drops the lock: the tier stays, owned by nobody."""
        os.close(self._fd)
        os.close(self._dir_fd)

    def remove(self) -> int:
        """Removes the tier (its regular files, the lock file last, the directory); returns the
        bytes given back. A directory holding anything else is left with that in it."""
        freed = 0
        try:
            for name in os.listdir(self._dir_fd):
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                if name != LOCK and stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=self._dir_fd)
                    freed += st.st_blocks * 512
            os.unlink(LOCK, dir_fd=self._dir_fd)
            os.rmdir(self.path)
        except OSError as exc:
            log.warning("RAM tier %s not removed completely: %s", self.path, exc)
        finally:
            self.release()
        return freed


def _take(path: Path) -> TierLock | None:
    """The lock of the tier at `path` (its lock file created if missing), or None while
    another process holds it.

    FileNotFoundError when the tier went away meanwhile (the caller tries again or skips it).
    """
    dir_fd = os.open(path, _DIR_FLAGS)
    try:
        if os.fstat(dir_fd).st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, "not ours", str(path))
        fd = os.open(LOCK, _LOCK_FLAGS, 0o600, dir_fd=dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine = os.fstat(fd)
        now = os.stat(LOCK, dir_fd=dir_fd, follow_symlinks=False)  # FileNotFoundError: gone
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise FileNotFoundError(errno.ENOENT, "lock file replaced", str(path))
    except BlockingIOError:
        os.close(fd)
        os.close(dir_fd)
        return None
    except BaseException:
        os.close(fd)
        os.close(dir_fd)
        raise
    return TierLock(path, dir_fd, fd)


def owner_of(path: Path) -> str:
    """Who the lock file names (for messages: the lock itself is the proof)."""
    try:
        with open(path / LOCK, "rb") as f:
            return f"pid {json.loads(f.read(4096))['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lock_tier(path: Path, wait: float = LOCK_WAIT) -> TierLock:
    """Creates (0700, ours) or reuses the tier directory at `path` and takes its lock."""
    deadline = time.monotonic() + wait
    while True:
        private_dir(path)  # refuses a symlink or someone else's directory
        try:
            lock = _take(path)
        except FileNotFoundError:  # removed by gc between our mkdir and our lock: again
            lock = None
        if lock is not None:
            lock.write_owner()
            return lock
        if time.monotonic() > deadline:
            raise AlreadyExists(
                f"the RAM tier {path} is in use by {owner_of(path)} "
                "(another worker or mount with the same --state?)"
            )
        time.sleep(0.02)  # polling a lock another process holds: there is no event to wait on


def mapped_by(path: Path) -> int | None:
    """The pid of a process that maps the file at `path`, if any (its /proc/PID/maps)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    inode = str(st.st_ino).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps", "rb") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[4] == inode:
                        major, minor = (int(x, 16) for x in fields[3].split(b":"))
                        if os.makedev(major, minor) == st.st_dev:
                            return int(entry.name)
        except (OSError, ValueError):
            continue
    return None


@dataclass
class Found:
    path: Path
    bytes: int
    reason: str  # why it is an orphan, or why it was kept


def _allocated(path: Path) -> int:
    """Bytes a tier directory's files take (allocated blocks)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def reclaim(path: Path, *, dry_run: bool = False) -> tuple[bool, Found] | None:
    """Removes the tier at `path` if it is an orphan: (removed, what); None if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return False, Found(path, 0, "not a directory")
    if st.st_uid != os.geteuid():
        return False, Found(path, _allocated(path), f"belongs to uid {st.st_uid}")
    size = _allocated(path)
    had_lock = os.path.lexists(path / LOCK)
    try:
        lock = _take(path)
    except FileNotFoundError:
        return None  # removed meanwhile
    except OSError as exc:  # e.g. a symlink planted as its lock file
        return False, Found(path, size, f"cannot lock it: {exc.strerror}")
    if lock is None:
        return False, Found(path, size, f"in use by {owner_of(path)}")
    mapper = mapped_by(path / SLAB)
    if mapper is not None or dry_run:
        if not had_lock:  # leave it as found
            with contextlib.suppress(OSError):
                os.unlink(path / LOCK)
        lock.release()
        if mapper is not None:
            return False, Found(path, size, f"mapped by pid {mapper}")
        return True, Found(path, size, "no running process owns it")
    return True, Found(path, lock.remove(), "no running process owns it")


def collect(shm_dir: Path, *, dry_run: bool = False) -> tuple[list[Found], list[Found]]:
    """`cachefs gc`: removes the orphaned tiers in `shm_dir`; (removed, kept)."""
    removed: list[Found] = []
    kept: list[Found] = []
    for path in sorted(shm_dir.glob(PREFIX + "*")):
        result = reclaim(path, dry_run=dry_run)
        if result is not None:
            (removed if result[0] else kept).append(result[1])
    return removed, kept


def release_stale(previous: str | None, current: Path | None) -> None:
    """A worker's tier of a previous run that this run will not use (it moved to another --shm,
    or --mem is now 0): removed unless something still uses it."""
    if not previous or (current is not None and Path(previous) == current):
        return
    result = reclaim(Path(previous))
    if result is None:
        return
    removed, found = result
    if removed:
        log.info("removed the RAM tier of a previous run: %s (%s)", found.path, human(found.bytes))
    else:
        log.warning("RAM tier of a previous run %s kept: %s", found.path, found.reason)


def check_share(shm_dir: Path, capacity: int, share: float, own: Path) -> None:
    """Refuses a RAM tier of `capacity` bytes in `shm_dir` that would take the cachefs tiers
    there past `share` % of the filesystem, or that does not fit in its free space. `own` is
    this worker's tier directory: its existing file (kept from a previous run) is replaced,
    so it is not counted."""
    probe = shm_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fs = os.statvfs(probe)
    size, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
    others = kept = 0
    for path in shm_dir.glob(PREFIX + "*"):
        if path == own:
            kept = _allocated(path)
        elif path.is_dir() and not path.is_symlink():
            others += _allocated(path)
    limit = int(size * share / 100)
    if capacity + others > limit:
        taken = ""
        if others:
            taken = f", {human(others)} of it taken by other cachefs tiers (`cachefs gc` "
            taken += "removes orphaned ones)"
        raise InvalidArgument(
            f"--mem {human(capacity)} exceeds the share of {shm_dir} left to RAM tiers: "
            f"{share:g}% of {human(size)} = {human(limit)}{taken}; lower --mem or raise "
            "--shm-share"
        )
    if capacity > free + kept:
        raise NoSpace(f"--mem {human(capacity)} exceeds the free space of {shm_dir} "
                      f"({human(free + kept)})")  # fmt: skip
