"""pyfuse3 Operations over `Vfs`: argument translation and the errno boundary.

This is the only place where exceptions become errnos: a `CacheFsError` carries its own errno,
a blown deadline is ETIMEDOUT, anything else is logged and answered EIO. Every operation that
can wait runs under a deadline (fuse/deadlines.py), so a stuck peer can never hang a reader in
the kernel.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import pyfuse3
import trio

from cachefs import metrics
from cachefs.errors import CacheFsError
from cachefs.fuse.deadlines import Watchdog
from cachefs.fuse.vfs import Vfs
from cachefs.meta import Attr

log = logging.getLogger("cachefs.fuse")

# Stores without permission bits (S3, HDFS, ...): readable by all, owned by the mount's user.
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555


def _errno_boundary(func=None, *, blocking: bool = True):
    """Wraps an op: counts it, and turns its errors into errnos.

    `blocking` ops (anything that may wait on the master, a worker or the store) run under the
    mount's deadline: a plain cancel scope the watchdog cancels (fuse/deadlines.py). Ops that
    only read memory (`blocking=False`) skip the scope, the most expensive part of a cheap op.
    """
    if func is None:
        return functools.partial(_errno_boundary, blocking=blocking)
    name = func.__name__.lstrip("_")  # `_read`: the full path of `read`
    latency = metrics.FUSE_OPS.op(name)
    clock = time.monotonic

    if blocking:

        @functools.wraps(func)
        async def wrapper(self: CacheFsOperations, *args):
            started = clock()
            inflight = self.watchdog.inflight
            scope = trio.CancelScope()
            inflight[scope] = started
            try:
                with scope:
                    return await func(self, *args)
                # Only the watchdog cancels this scope, and only past the deadline.
                log.warning("%s exceeded its %.0fs deadline", name, self.watchdog.timeout)
                raise pyfuse3.FUSEError(errno.ETIMEDOUT)
            except Exception as exc:
                raise _to_errno(name, exc) from None
            finally:
                inflight.pop(scope, None)
                latency.observe(clock() - started)

    else:

        @functools.wraps(func)
        async def wrapper(self: CacheFsOperations, *args):
            started = clock()
            try:
                return await func(self, *args)
            except Exception as exc:
                raise _to_errno(name, exc) from None
            finally:
                latency.observe(clock() - started)

    return wrapper


def _with_fast_path(fast, full):
    """An op that first tries `fast` (plain code: it cannot wait, so it needs no deadline) and
    takes `full` (an `_errno_boundary` op) when `fast` answers None."""
    latency = metrics.FUSE_OPS.op(full.__name__.lstrip("_"))
    clock = time.monotonic

    async def op(self: CacheFsOperations, *args):
        started = clock()
        try:
            result = fast(self, *args)
        except Exception:  # the fast path is an optimisation: the full path decides
            log.exception("fast path of %s failed", full.__name__)
            result = None
        if result is None:
            return await full(self, *args)
        latency.observe(clock() - started)
        return result

    return op


def _to_errno(op: str, exc: Exception) -> pyfuse3.FUSEError:
    """The errno an op's exception answers."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, CacheFsError):
        if exc.errno not in (errno.ENOENT, errno.ENODATA, errno.EROFS):
            log.warning("%s failed: %s", op, exc.message)
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, trio.TooSlowError):  # a deadline of its own inside the op
        log.warning("%s timed out", op)
        return pyfuse3.FUSEError(errno.ETIMEDOUT)
    log.error("%s failed unexpectedly", op, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def _ignore_enoent(func, *args) -> None:
    """Kernel invalidations fail with ENOENT when the kernel had nothing cached: fine."""
    try:
        func(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


async def _read_only(*_args) -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


# The patched pyfuse3 (scripts/pyfuse3-3.5.0.patch) hands read() the inode of a file opened
# without OPEN. Then `open` answers ENOSYS once and the kernel stops sending OPEN and RELEASE
# for the mount's lifetime (no_open), keeping the page cache across opens. Stock pyfuse3: the
# handle of an open is the inode, the same read path with two more requests per file.
ZERO_MESSAGE_OPEN = getattr(pyfuse3, "READS_BY_INODE", False)


class CacheFsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        vfs: Vfs,
        *,
        entry_timeout: float = 3600.0,
        attr_timeout: float = 3600.0,
        op_timeout: float = 60.0,
    ):
        super().__init__()
        self.vfs = vfs
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.watchdog = Watchdog(op_timeout)  # its run() belongs in the mount's nursery
        self.initialized = trio.Event()
        self._uid, self._gid = os.getuid(), os.getgid()

    def init(self) -> None:
        # libfuse calls this on the event loop's thread while it answers FUSE_INIT; the reply
        # is written before any task runs again, so waiters see a negotiated connection.
        self.initialized.set()

    # ---- translation ---------------------------------------------------------------------

    def _to_fuse(self, ino: int) -> int:
        return pyfuse3.ROOT_INODE if ino == self.vfs.root.ino else ino

    def _from_fuse(self, ino: int) -> int:
        return self.vfs.root.ino if ino == pyfuse3.ROOT_INODE else ino

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._to_fuse(attr.ino)
        entry.generation = 0
        entry.entry_timeout = self.entry_timeout
        entry.attr_timeout = self.attr_timeout
        if attr.mode is None:
            entry.st_mode = DIR_MODE if attr.is_dir else FILE_MODE
            entry.st_uid, entry.st_gid = self._uid, self._gid
        else:
            # The source's bits, enforced by the kernel (default_permissions); never setuid,
            # setgid or sticky: a remote file must not grant privileges on this host.
            kind = stat.S_IFDIR if attr.is_dir else stat.S_IFREG
            entry.st_mode = kind | (attr.mode & 0o777)
            entry.st_uid = self._uid if attr.uid is None else attr.uid
            entry.st_gid = self._gid if attr.gid is None else attr.gid
        entry.st_nlink = 2 if attr.is_dir else 1
        entry.st_rdev = 0
        entry.st_size = attr.size
        entry.st_blksize = 1 << 20
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.mtime_ns
        return entry

    # ---- metadata ------------------------------------------------------------------------

    def _lookup_now(self, parent_inode, name, ctx=None):
        attr = self.vfs.lookup_now(self._from_fuse(parent_inode), os.fsdecode(name))
        return None if attr is None else self._entry(attr)

    @_errno_boundary
    async def _lookup(self, parent_inode, name, ctx=None):
        attr = await self.vfs.lookup(self._from_fuse(parent_inode), os.fsdecode(name))
        return self._entry(attr)

    lookup = _with_fast_path(_lookup_now, _lookup)

    @_errno_boundary
    async def getattr(self, inode, ctx=None):
        return self._entry(await self.vfs.getattr(self._from_fuse(inode)))

    async def forget(self, inode_list):
        self.vfs.forget([(self._from_fuse(ino), n) for ino, n in inode_list])

    @_errno_boundary
    async def opendir(self, inode, ctx):
        return await self.vfs.opendir(self._from_fuse(inode))

    @_errno_boundary
    async def readdir(self, fh, start_id, token):
        while True:
            page = await self.vfs.readdir(fh, start_id)
            if not page:
                return
            for name, attr, next_id in page:
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), next_id):
                    return
                self.vfs.readdir_accepted(fh, name, attr)
                start_id = next_id

    @_errno_boundary(blocking=False)
    async def releasedir(self, fh):
        self.vfs.releasedir(fh)

    @_errno_boundary
    async def statfs(self, ctx):
        stats = await self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = (stats["bytes"] + 4095) // 4096
        out.f_bfree = out.f_bavail = 0
        out.f_files = stats["files"] + stats["dirs"]
        out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    @_errno_boundary
    async def access(self, inode, mode, ctx):
        await self.vfs.access(self._from_fuse(inode), mode)
        return True

    @_errno_boundary
    async def listxattr(self, inode, ctx):
        return [name.encode() for name in await self.vfs.listxattr(self._from_fuse(inode))]

    @_errno_boundary
    async def getxattr(self, inode, name, ctx):
        return await self.vfs.getxattr(self._from_fuse(inode), os.fsdecode(name))

    # ---- data ----------------------------------------------------------------------------

    @_errno_boundary
    async def open(self, inode, flags, ctx):
        if ZERO_MESSAGE_OPEN:  # the kernel checked the mode bits and the read-only mount
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = await self.vfs.open(self._from_fuse(inode), flags)
        # The dataset is a snapshot: pages stay valid across opens (keep_cache).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    # `fh` is the inode: the handle open returned, or the patched pyfuse3's no_open case.
    def _read_now(self, fh, off, size):
        return self.vfs.read_now(self._from_fuse(fh), off, size)

    @_errno_boundary
    async def _read(self, fh, off, size):
        return await self.vfs.read(self._from_fuse(fh), off, size)

    read = _with_fast_path(_read_now, _read)

    @_errno_boundary(blocking=False)
    async def release(self, fh):
        self.vfs.release(fh)

    # ---- re-syncs --------------------------------------------------------------------------

    async def apply_changes(self) -> int:
        """Polls the master for re-syncs and drops what the kernel cached of changed entries."""
        changes = await self.vfs.poll_changes()
        # The kernel may wait on requests this event loop serves: call it from a thread.
        for parent, name in changes.entries:
            await trio.to_thread.run_sync(
                _ignore_enoent, pyfuse3.invalidate_entry, self._to_fuse(parent), os.fsencode(name)
            )
        for ino in changes.inodes:
            await trio.to_thread.run_sync(
                _ignore_enoent, pyfuse3.invalidate_inode, self._to_fuse(ino)
            )
        return len(changes.entries)

    # ---- everything that would write -----------------------------------------------------

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    create = write = setxattr = removexattr = _read_only
