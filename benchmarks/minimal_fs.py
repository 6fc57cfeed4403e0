"""The floor of a Python FUSE server here: a read-only pyfuse3 file system serving a tree from RAM.

At start every file of SOURCE_DIR is read into memory; then the mount answers lookup, getattr,
opendir, readdir (readdirplus) and read from dicts, with one-hour entry/attr timeouts and
keep_cache, and no deadlines, metrics or checks. Whatever cachefs spends above this on the warm
path is its own overhead, not pyfuse3's or the kernel's.

    python benchmarks/minimal_fs.py SOURCE_DIR MOUNTPOINT    # foreground; SIGTERM/SIGINT unmount

With cachefs's pyfuse3 patch (pyfuse3.READS_BY_INODE), open answers ENOSYS: the kernel then
stops sending OPEN and RELEASE (keep_cache is implied) and read() gets the inode as its handle,
which is what cachefs does too.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefs.fuse.mount import set_read_ahead  # noqa: E402

CACHE_TIMEOUT = 3600.0  # seconds the kernel may keep entries and attributes: the tree never changes
READ_AHEAD_KB = 1024  # as cachefs mounts (its --read-ahead-kb default)
READS_BY_INODE = getattr(pyfuse3, "READS_BY_INODE", False)


class MemoryTree(pyfuse3.Operations):
    def __init__(self, source: Path):
        super().__init__()
        self.data: dict[int, bytes] = {}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        # directory inode -> [(name, inode)] in readdir order; children by name for lookup
        self.entries: dict[int, list[tuple[bytes, int]]] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.init_done = trio.Event()
        self._load(source)

    def _load(self, source: Path) -> None:
        next_inode = pyfuse3.ROOT_INODE + 1
        pending = [(source, pyfuse3.ROOT_INODE)]
        self.attrs[pyfuse3.ROOT_INODE] = self._attributes(pyfuse3.ROOT_INODE, source.stat())
        while pending:
            directory, inode = pending.pop()
            listing = []
            with os.scandir(directory) as scan:
                for entry in sorted(scan, key=lambda e: e.name):
                    child = next_inode
                    next_inode += 1
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), child))
                    elif entry.is_file(follow_symlinks=False):
                        self.data[child] = Path(entry.path).read_bytes()
                    else:
                        continue  # symlinks and specials: not part of a dataset
                    self.attrs[child] = self._attributes(child, st)
                    listing.append((os.fsencode(entry.name), child))
            self.entries[inode] = listing
            self.children[inode] = dict(listing)

    @staticmethod
    def _attributes(inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        is_dir = stat.S_ISDIR(st.st_mode)
        attr.st_mode = (stat.S_IFDIR | 0o555) if is_dir else (stat.S_IFREG | 0o444)
        attr.st_nlink = 2 if is_dir else 1
        attr.st_size = 0 if is_dir else st.st_size
        attr.st_blksize = 128 * 1024
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = st.st_mtime_ns
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.entry_timeout = attr.attr_timeout = CACHE_TIMEOUT
        return attr

    def init(self) -> None:
        # Called before libfuse answers FUSE_INIT; the readahead is set after (see serve()).
        self.init_done.set()

    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.children.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[inode]

    async def getattr(self, inode, ctx=None):
        return self.attrs[inode]

    async def opendir(self, inode, ctx):
        if inode not in self.entries:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        listing = self.entries[fh]
        for index in range(start_id, len(listing)):
            name, inode = listing[index]
            if not pyfuse3.readdir_reply(token, name, self.attrs[inode], index + 1):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if READS_BY_INODE:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # zero-message open from now on
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return self.data[fh][off : off + size]

    async def release(self, fh):
        pass


async def serve(tree: MemoryTree, mountpoint: Path) -> None:
    async def read_ahead_after_init() -> None:
        # The kernel resets the readahead when it processes the FUSE_INIT reply, which libfuse
        # sends right after init() returns: by the time this task runs again, it has.
        await tree.init_done.wait()
        await trio.sleep(0.1)
        set_read_ahead(mountpoint, READ_AHEAD_KB)

    async def unmount_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_ahead_after_init)
        nursery.start_soon(unmount_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} SOURCE_DIR MOUNTPOINT")
    logging.basicConfig(level=logging.INFO, format="minimal_fs: %(message)s")
    source, mountpoint = Path(sys.argv[1]), Path(sys.argv[2])
    tree = MemoryTree(source)
    total = sum(map(len, tree.data.values()))
    logging.info("%d files, %.0f MiB in RAM", len(tree.data), total / (1 << 20))
    options = set(pyfuse3.default_options) | {"fsname=minimal_fs", "ro"}
    pyfuse3.init(tree, str(mountpoint), options)
    try:
        trio.run(serve, tree, mountpoint)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
