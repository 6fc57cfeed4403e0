"""Errno matrix on a real mount, table-driven from pjdfstest's expectations for a read-only
file system (EROFS cases) plus the lookup errors every file system shares."""

from __future__ import annotations

import errno
import os

import pytest

FILE = "d/file.bin"
DIR = "d"
MISSING = "d/missing"

# (name, action(root), expected errno or None for success)
MATRIX = [
    ("open O_RDONLY file", lambda r: os.close(os.open(r / FILE, os.O_RDONLY)), None),
    ("open O_WRONLY file", lambda r: os.open(r / FILE, os.O_WRONLY), errno.EROFS),
    ("open O_RDWR file", lambda r: os.open(r / FILE, os.O_RDWR), errno.EROFS),
    ("open O_TRUNC file", lambda r: os.open(r / FILE, os.O_RDONLY | os.O_TRUNC), errno.EROFS),
    ("open O_CREAT new", lambda r: os.open(r / MISSING, os.O_CREAT | os.O_WRONLY), errno.EROFS),
    ("open missing", lambda r: os.open(r / MISSING, os.O_RDONLY), errno.ENOENT),
    ("open under a file", lambda r: os.open(r / FILE / "x", os.O_RDONLY), errno.ENOTDIR),
    ("read a directory fd", lambda r: _read_dir_fd(r / DIR), errno.EISDIR),
    ("mkdir new", lambda r: os.mkdir(r / MISSING), errno.EROFS),
    ("mkdir existing", lambda r: os.mkdir(r / DIR), errno.EEXIST),
    ("rmdir dir", lambda r: os.rmdir(r / DIR), errno.EROFS),
    ("unlink file", lambda r: os.unlink(r / FILE), errno.EROFS),
    ("rename file", lambda r: os.rename(r / FILE, r / MISSING), errno.EROFS),
    ("link file", lambda r: os.link(r / FILE, r / MISSING), errno.EROFS),
    ("symlink new", lambda r: os.symlink("target", r / MISSING), errno.EROFS),
    ("mknod fifo new", lambda r: os.mkfifo(r / MISSING), errno.EROFS),
    ("chmod file", lambda r: os.chmod(r / FILE, 0o600), errno.EROFS),
    ("chown file", lambda r: os.chown(r / FILE, 1, 1), errno.EROFS),
    ("utime file", lambda r: os.utime(r / FILE, (1, 1)), errno.EROFS),
    ("truncate file", lambda r: os.truncate(r / FILE, 0), errno.EROFS),
    ("setxattr file", lambda r: os.setxattr(r / FILE, "user.x", b"1"), errno.EROFS),
    ("removexattr file", lambda r: os.removexattr(r / FILE, "user.cachefs.cached"), errno.EROFS),
    ("getxattr unknown", lambda r: os.getxattr(r / FILE, "user.unknown"), errno.ENODATA),
    ("listdir a file", lambda r: os.listdir(r / FILE), errno.ENOTDIR),
    ("stat missing", lambda r: os.stat(r / MISSING), errno.ENOENT),
    ("stat under a file", lambda r: os.stat(r / FILE / "x"), errno.ENOTDIR),
    ("readlink a file", lambda r: os.readlink(r / FILE), errno.EINVAL),
    ("access W_OK", lambda r: _access(r / FILE, os.W_OK), errno.EROFS),
    ("access R_OK", lambda r: _access(r / FILE, os.R_OK), None),
]


def _read_dir_fd(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.read(fd, 10)
    finally:
        os.close(fd)


def _access(path, mode):
    if not os.access(path, mode):
        # os.access hides the errno; faccessat through the libc wrapper reports it
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.access(os.fsencode(path), mode) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    from tests.fuse.conftest import Mounts

    tmp = tmp_path_factory.mktemp("errno")
    (tmp / "source" / "d").mkdir(parents=True)
    (tmp / "source" / FILE).write_bytes(b"content")
    mounts = Mounts(tmp)
    try:
        yield mounts.embedded((tmp / "source").as_uri())
    finally:
        mounts.cleanup()


@pytest.mark.parametrize(("name", "action", "expected"), MATRIX, ids=[m[0] for m in MATRIX])
def test_errno(mounted, name, action, expected):
    if expected is None:
        action(mounted)
        return
    with pytest.raises(OSError) as info:
        action(mounted)
    assert info.value.errno == expected, f"{name}: {info.value}"
    assert (mounted / FILE).read_bytes() == b"content"  # nothing was changed
