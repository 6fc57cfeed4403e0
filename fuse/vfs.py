"""POSIX semantics of a read-only dataset view: inode table, lookups, handles. No pyfuse3 here.

Inode numbers are the master's (stable across syncs and restarts); the FUSE layer maps only the
root. Metadata is a snapshot, so what the master answered is cached without expiry; the kernel
lookup counts decide when an inode's cached attributes may be dropped.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass, field

import trio

from cachefs.errors import (
    CacheFsError,
    IsADirectory,
    NoAttribute,
    NotADirectory,
    ReadOnly,
    Unavailable,
)
from cachefs.fuse.reader import DataReader, FileReader
from cachefs.meta import Attr
from cachefs.rpc import RpcClient

READDIR_PAGE = 1000
XATTR_CACHED = "user.cachefs.cached"
XATTR_OWNER = "user.cachefs.owner"
XATTRS = (XATTR_CACHED, XATTR_OWNER)


@dataclass
class _Inode:
    attr: Attr
    path: str
    parent: int = 0
    name: str = ""
    lookups: int = 0


@dataclass
class Changes:
    """What a re-sync changed that the kernel may have cached (master inode numbers)."""

    inodes: list[int] = field(default_factory=list)
    entries: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _DirHandle:
    ino: int
    entries: list[tuple[str, Attr]] = field(default_factory=list)
    complete: bool = False


class Vfs:
    def __init__(self, dataset: str, master: RpcClient, reader: DataReader, nursery: trio.Nursery):
        self.dataset = dataset
        self.master = master
        self.reader = reader
        self._nursery = nursery
        self._inodes: dict[int, _Inode] = {}
        # Every (parent, name) -> attr the master answered: the fallback while it is down.
        self._known_entries: dict[tuple[int, str], Attr] = {}
        self._handles: dict[int, FileReader | _DirHandle] = {}
        self._fh = itertools.count(1)
        self.root: Attr | None = None
        self.generation = 0

    async def start(self) -> None:
        info = await self.master.call("dataset_info", name=self.dataset)
        self.generation = info["generation"]
        self.root = Attr.from_wire(await self.master.call("root", dataset=self.dataset))
        self._inodes[self.root.ino] = _Inode(self.root, "", lookups=1)  # never forgotten

    async def poll_changes(self) -> Changes:
        """Picks up re-syncs: refreshes cached attributes and says what the kernel must drop.

        Handles already open keep the attributes (so the version) they opened with.
        """
        reply = await self.master.call("changes", dataset=self.dataset, since=self.generation)
        out = Changes()
        if reply["generation"] == self.generation:
            return out
        if reply["complete"]:
            touched = {(parent, name, ino) for parent, name, ino in reply["changes"]}
            for parent, name, _ in touched:
                self._known_entries.pop((parent, name), None)
        else:  # the log does not reach back: everything cached is suspect
            touched = {(n.parent, n.name, ino) for ino, n in self._inodes.items() if n.parent}
            self._known_entries.clear()
        for parent, name, _old_ino in touched:
            # The entry is dropped (the next lookup finds the new inode), and the directory's
            # attributes and listing; the old inode's pages stay for handles already open.
            out.entries.append((parent, name))
            if parent in self._inodes and parent not in out.inodes:
                out.inodes.append(parent)
        for ino in out.inodes:
            node = self._inodes[ino]
            try:
                node.attr = Attr.from_wire(
                    await self.master.call("getattr", dataset=self.dataset, ino=ino)
                )
            except CacheFsError:  # removed: the kernel forgets it once its entry is dropped
                pass
        self.generation = reply["generation"]
        return out

    # ---- metadata ------------------------------------------------------------------------

    def _known(self, ino: int) -> _Inode:
        node = self._inodes.get(ino)
        if node is None:
            raise CacheFsError(f"inode {ino} is not known to the client", errno=errno.ESTALE)
        return node

    def _remember(self, attr: Attr, parent: int, name: str) -> Attr:
        node = self._inodes.get(attr.ino)
        if node is None:
            parent_path = self._inodes[parent].path
            path = f"{parent_path}/{name}" if parent_path else name
            node = self._inodes[attr.ino] = _Inode(attr, path, parent, name)
        else:  # a directory keeps its inode across syncs; its bits and mtime may have moved
            node.attr = attr
        node.lookups += 1
        return node.attr

    async def lookup(self, parent: int, name: str) -> Attr:
        """The child `name` of directory `parent`; counts one kernel lookup."""
        parent_node = self._known(parent)
        if not parent_node.attr.is_dir:
            raise NotADirectory(f"{parent_node.path or '/'} is not a directory")
        try:
            attr = Attr.from_wire(
                await self.master.call("lookup", dataset=self.dataset, parent=parent, name=name)
            )
        except Unavailable:
            # The master is down: answer from what it told us before (the snapshot), so files
            # whose kernel entries expired stay readable.
            attr = self._known_entries.get((parent, name))
            if attr is None:
                raise
        else:
            self._known_entries[(parent, name)] = attr
        return self._remember(attr, parent, name)

    async def getattr(self, ino: int) -> Attr:
        return self._known(ino).attr

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, count in items:
            node = self._inodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and ino != self.root.ino:
                del self._inodes[ino]

    def path_of(self, ino: int) -> str:
        return self._known(ino).path

    # ---- directories ---------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        if not self._known(ino).attr.is_dir:
            raise NotADirectory("not a directory")
        fh = next(self._fh)
        self._handles[fh] = _DirHandle(ino)
        return fh

    async def readdir(self, fh: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from position `start` on, each with the position after it (a page at most)."""
        handle = self._handles[fh]
        assert isinstance(handle, _DirHandle)
        while start >= len(handle.entries) and not handle.complete:
            after = handle.entries[-1][0] if handle.entries else None
            reply = await self.master.call(
                "readdir", dataset=self.dataset, ino=handle.ino, after=after, limit=READDIR_PAGE
            )
            handle.entries.extend((name, Attr.from_wire(a)) for name, a in reply["entries"])
            handle.complete = not reply["more"]
        page = handle.entries[start : start + READDIR_PAGE]
        return [(name, attr, start + i + 1) for i, (name, attr) in enumerate(page)]

    def readdir_accepted(self, fh: int, name: str, attr: Attr) -> None:
        """The kernel took an entry with attributes (readdirplus): that counts as a lookup."""
        handle = self._handles[fh]
        self._known_entries[(handle.ino, name)] = attr
        self._remember(attr, handle.ino, name)

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # ---- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("cachefs mounts are read-only")
        node = self._known(ino)
        if node.attr.is_dir:
            raise IsADirectory(f"{node.path} is a directory")
        fh = next(self._fh)
        self._handles[fh] = FileReader(self.reader, node.path, node.attr, self._nursery)
        return fh

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileReader):
            raise CacheFsError("bad file handle", errno=errno.EBADF)
        return await handle.read(offset, size)

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # ---- the rest ------------------------------------------------------------------------

    async def statfs(self) -> dict:
        return await self.master.call("statfs", dataset=self.dataset)

    def listxattr(self, ino: int) -> list[str]:
        return [] if self._known(ino).attr.is_dir else list(XATTRS)

    async def getxattr(self, ino: int, name: str) -> bytes:
        node = self._known(ino)
        if node.attr.is_dir or name not in XATTRS:
            raise NoAttribute(f"no attribute {name}")
        cached, owner = await self.reader.cached_bytes(node.path, node.attr)
        return str(cached if name == XATTR_CACHED else owner or "").encode()

    def access(self, ino: int, mode: int) -> None:
        self._known(ino)
        if mode & os.W_OK:
            raise ReadOnly("cachefs mounts are read-only")
