"""Private files of this user: the runtime dir, state dirs, append-only logs and pid files.

cachefs often runs as root, so nothing here trusts what it finds: a runtime or state dir must
be a real directory owned by us and closed to others, files are opened without following
symlinks, and a pid file only names a process that still is the cachefs process it recorded.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cachefs.errors import PermissionDenied

#: Options of a private file: never follow a planted symlink, never leak into children.
_PRIVATE = os.O_NOFOLLOW | os.O_CLOEXEC


def _check_private_dir(path: Path) -> None:
    """Refuse `path` unless it is a directory (not a symlink) owned by us, closed to others."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionDenied(f"{path} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.geteuid():
        raise PermissionDenied(
            f"{path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}); refusing to "
            "use it (remove it, or set XDG_RUNTIME_DIR)"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours: close it rather than fail


def private_dir(path: Path) -> Path:
    """Create `path` 0700 if missing (parents too), then check it as `_check_private_dir` does."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:  # a dangling symlink or a file in the way
        pass
    _check_private_dir(path)
    return path


def runtime_dir() -> Path:
    """Where pid files, mount logs and published secrets live: private to this user."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) if xdg else Path(f"/tmp/cachefs-{os.geteuid()}")
    if not xdg:
        private_dir(base)  # /tmp is shared: someone may have planted it first
    return private_dir(base / "cachefs")


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int:
    """An fd for a 0600 file at `path`, which must not be a symlink (ELOOP otherwise)."""
    fd = os.open(path, flags | _PRIVATE, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with a 0600 file holding `data`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---- pid files ---------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (stable for the process's life)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and ')': the fields start after the last ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def write_pid_file(path: Path, **extra) -> None:
    """Record this process (pid + start time) and `extra` facts about it."""
    record = {"pid": os.getpid(), "start": _start_time(os.getpid()), **extra}
    write_private(path, json.dumps(record).encode())


def read_pid_file(path: Path) -> dict | None:
    """The record of a live cachefs process, or None (missing, forged, or a reused pid).

    A pid is trusted only if that process started when the file says and runs cachefs.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _PRIVATE)
    except OSError:
        return None
    try:
        record = json.loads(os.read(fd, 65536))
        pid = record["pid"]
        if not isinstance(pid, int) or pid <= 0 or _start_time(pid) != record.get("start"):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"cachefs" not in f.read():
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    finally:
        os.close(fd)
    return record


def private_lmdb(path: Path) -> str:
    """Prepare an lmdb environment dir: 0700, with files (also those of old versions) 0600.

    Open it with `mode=0o600` so new files are born private; returns the path for lmdb.open.
    """
    private_dir(path)
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.chmod(path / name, 0o600, follow_symlinks=False)
        except FileNotFoundError:
            pass
    return str(path)
