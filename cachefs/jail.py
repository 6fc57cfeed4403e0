"""Opening paths strictly beneath a directory: a file:// dataset's root is a jail.

A path below the root may contain symlinks; they are followed only while every step of the
resolution stays beneath the root. Linux's openat2(2) with RESOLVE_BENEATH does that in the
kernel, race-free: an absolute symlink (even one pointing back inside the root), a `..` that
climbs above the root, or an absolute path fails with EXDEV. Kernels without openat2 (< 5.6)
get a weaker fallback: the resolved path must lie inside the resolved root, and the last
component is opened with O_NOFOLLOW so a link swapped in after the check is not followed.

An escape is reported as `Escape`, a FileNotFoundError: outside the root nothing exists as far
as the dataset is concerned, and a caller must not learn more than that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)
RESOLVE_NO_MAGICLINKS = 0x02  # no /proc/<pid>/fd-style links, which jump anywhere
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Escape(FileNotFoundError):
    """The path leaves the root (or loops): treated exactly like a missing file."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True  # cleared at the first ENOSYS


def _escape(rel: str) -> Escape:
    return Escape(errno.ENOENT, "outside the dataset root", rel)


def _openat2(root_fd: int, rel: str, flags: int) -> int:
    how = _OpenHow(flags, 0, _RESOLVE)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(root_fd),
        ctypes.c_char_p(os.fsencode(rel)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


def _open_fallback(root_fd: int, rel: str, flags: int) -> int:
    """Without openat2: containment of the resolved path, O_NOFOLLOW on its last component.

    Weaker than RESOLVE_BENEATH: a directory renamed between the check and the open is not
    caught, and an absolute link resolving inside the root is accepted.
    """
    if os.path.isabs(rel):
        raise _escape(rel)
    base = os.path.realpath(os.readlink(f"/proc/self/fd/{root_fd}"))
    target = os.path.realpath(os.path.join(base, rel))
    if target != base and not target.startswith(base.rstrip("/") + "/"):
        raise _escape(rel)
    fd = os.open(target, flags | os.O_NOFOLLOW)
    if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH opens the link itself
        os.close(fd)
        raise _escape(rel)
    return fd


def open_beneath(root_fd: int, rel: str, flags: int) -> int:
    """An fd for `rel` resolved strictly beneath the directory `root_fd` ("" is the root).

    Raises Escape for a path that leaves the root or loops, other OSErrors as open(2) does.
    """
    global _have_openat2
    rel = rel or "."
    flags |= os.O_CLOEXEC
    try:
        if _have_openat2:
            try:
                return _openat2(root_fd, rel, flags)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                _have_openat2 = False
        return _open_fallback(root_fd, rel, flags)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ELOOP):
            raise _escape(rel) from None
        raise


def open_root(root: str) -> int:
    """An O_PATH fd of the root directory itself (the root's own path is trusted config)."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def stat_beneath(root: int | str, rel: str) -> os.stat_result | None:
    """stat of `rel` (its last symlink followed, inside the root); None if missing or escaping."""
    owned = not isinstance(root, int)
    root_fd = open_root(root) if owned else root
    try:
        fd = open_beneath(root_fd, rel, os.O_PATH)
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        if owned:
            os.close(root_fd)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def open_regular(root_fd: int, rel: str) -> tuple[int, os.stat_result]:
    """A read-only fd (and its fstat) of the regular file `rel` beneath `root_fd`.

    The type is checked on an O_PATH fd first, so a FIFO or a device is never opened for
    reading (which could block or have side effects); IsADirectoryError for a directory,
    FileNotFoundError for anything else that is not a regular file.
    """
    probe = open_beneath(root_fd, rel, os.O_PATH)
    try:
        st = os.fstat(probe)
    finally:
        os.close(probe)
    _check_regular(st, rel)
    # O_NONBLOCK: should a FIFO have been swapped in since the probe, the open cannot hang.
    fd = open_beneath(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        now = os.fstat(fd)
        _check_regular(now, rel)
    except BaseException:
        os.close(fd)
        raise
    return fd, now


def _check_regular(st: os.stat_result, rel: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(errno.ENOENT, "not a regular file", rel)
