"""POSIX semantics of a read-only dataset view: inode table, lookups, reads. No pyfuse3 here.

Inode numbers are the master's (stable across syncs and restarts); the FUSE layer maps only the
root. Metadata is a snapshot, so what the master answered is cached without expiry; the kernel
lookup counts decide when an inode's cached attributes may be dropped.

Nothing is keyed by a per-process handle: files and directories are read by inode (the handle
the kernel passes back *is* the inode, or 0 with zero-message open), so any serving process of
a mount answers any request. An inode this process never looked up (another process did, or
it was forgotten) is found in the mount's shared metadata cache (fuse/metacache.py), or asked
of the master, which knows it while it is in the snapshot.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from cachefs.errors import (
    CacheFsError,
    IsADirectory,
    NoAttribute,
    NotADirectory,
    NotFound,
    ReadOnly,
    Unavailable,
)
from cachefs.fuse.metacache import MetaCache
from cachefs.fuse.reader import DataReader, FileReaders
from cachefs.meta import Attr
from cachefs.rpc import RpcClient

READDIR_PAGE = 1000
LISTINGS = 64  # directory listings kept (LRU), each paged in from the master as read
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
class _Listing:
    entries: list[tuple[str, Attr]] = field(default_factory=list)
    complete: bool = False


class Vfs:
    def __init__(
        self,
        dataset: str,
        master: RpcClient,
        reader: DataReader,
        nursery: trio.Nursery,
        meta: MetaCache,
        *,
        cached_lookups: bool = True,
    ):
        self.dataset = dataset
        self.master = master
        self.reader = reader
        self._nursery = nursery
        self._inodes: dict[int, _Inode] = {}  # what the kernel looked up through this process
        # Every entry any serving process of the mount learned: the fallback while the master
        # is down, and where a process finds inodes another one looked up.
        self.meta = meta
        # Names the mount knows are answered from `meta`, as of the snapshot it last polled
        # (at most `change_poll` behind a re-sync, as the kernel's own entry cache is); False
        # asks the master on every lookup (the reference model checks that contract).
        self.cached_lookups = cached_lookups
        self._listings: OrderedDict[int, _Listing] = OrderedDict()
        self._files = FileReaders(reader, nursery)
        self.root: Attr | None = None
        self.generation = 0

    async def start(self) -> None:
        info = await self.master.call("dataset_info", name=self.dataset)
        self.generation = info["generation"]
        self.root = Attr.from_wire(await self.master.call("root", dataset=self.dataset))
        self._inodes[self.root.ino] = _Inode(self.root, "", lookups=1)  # never forgotten

    async def poll_changes(self) -> Changes:
        """Picks up re-syncs: refreshes cached attributes and says what the kernel must drop.

        Handles already open keep the attributes (so the version) they opened with. Every
        serving process polls: each drops what it looked up (the shared cache drops once).
        """
        reply = await self.master.call("changes", dataset=self.dataset, since=self.generation)
        out = Changes()
        if reply["generation"] == self.generation:
            return out
        if reply["complete"]:
            touched = {(parent, name) for parent, name, _ in reply["changes"]}
            self.meta.drop(sorted(touched))
        else:  # the log does not reach back: everything cached is suspect
            touched = {(n.parent, n.name) for n in self._inodes.values() if n.parent}
            touched.update(self.meta.entries())
            self.meta.clear()
        for parent, name in sorted(touched):
            # The entry is dropped (the next lookup finds the new inode), and the directory's
            # attributes and listing; the old inode's pages stay for handles already open.
            out.entries.append((parent, name))
            if parent not in out.inodes and (parent in self._inodes or self.meta.inode(parent)):
                out.inodes.append(parent)
        for ino in out.inodes:
            self._listings.pop(ino, None)
            try:
                attr = Attr.from_wire(
                    await self.master.call("getattr", dataset=self.dataset, ino=ino)
                )
            except CacheFsError:  # removed: the kernel forgets it once its entry is dropped
                continue
            if ino in self._inodes:
                self._inodes[ino].attr = attr
            self.meta.update_attr(attr)
        self.generation = reply["generation"]
        return out

    # ---- metadata ------------------------------------------------------------------------

    def _known_now(self, ino: int) -> _Inode | None:
        """An inode this process looked up, or one the mount's shared cache has (another
        serving process looked it up, or this one forgot it); None: ask the master."""
        node = self._inodes.get(ino)
        if node is not None:
            return node
        shared = self.meta.inode(ino)
        if shared is None:
            return None
        attr, path, parent, name = shared
        return _Inode(attr, path, parent, name)

    async def _known(self, ino: int) -> _Inode:
        node = self._known_now(ino)
        return node if node is not None else await self._borrow(ino)

    async def _borrow(self, ino: int) -> _Inode:
        """An inode no process of this mount has seen (e.g. it was dropped by a re-sync)."""
        try:
            attr = Attr.from_wire(await self.master.call("getattr", dataset=self.dataset, ino=ino))
            path = await self.master.call("path_of", dataset=self.dataset, ino=ino)
        except NotFound:
            raise CacheFsError(
                f"inode {ino} is no longer in the dataset", errno=errno.ESTALE
            ) from None
        self.meta.remember_inode(path, attr)
        return _Inode(attr, path)

    def _remember(self, attr: Attr, parent: _Inode, parent_ino: int, name: str) -> Attr:
        """Counts one kernel lookup of `name` in `parent`."""
        node = self._inodes.get(attr.ino)
        if node is None:
            path = _child_path(parent.path, name)
            node = self._inodes[attr.ino] = _Inode(attr, path, parent_ino, name)
        else:  # a directory keeps its inode across syncs; its bits and mtime may have moved
            node.attr = attr
        node.lookups += 1
        return node.attr

    def lookup_now(self, parent: int, name: str) -> Attr | None:
        """The fast path of `lookup`: a name the mount knows, answered without waiting."""
        if not self.cached_lookups:
            return None
        parent_node = self._inodes.get(parent)
        if parent_node is None or not parent_node.attr.is_dir:
            return None
        attr = self.meta.entry(parent, name)
        return None if attr is None else self._remember(attr, parent_node, parent, name)

    async def lookup(self, parent: int, name: str) -> Attr:
        """The child `name` of directory `parent`; counts one kernel lookup."""
        parent_node = await self._known(parent)
        if not parent_node.attr.is_dir:
            raise NotADirectory(f"{parent_node.path or '/'} is not a directory")
        if self.cached_lookups and (known := self.meta.entry(parent, name)) is not None:
            return self._remember(known, parent_node, parent, name)
        try:
            attr = Attr.from_wire(
                await self.master.call("lookup", dataset=self.dataset, parent=parent, name=name)
            )
        except Unavailable:
            # The master is down: answer from what it told the mount before (the snapshot), so
            # files whose kernel entries expired stay readable.
            attr = self.meta.entry(parent, name)
            if attr is None:
                raise
        else:
            self.meta.remember(parent, name, _child_path(parent_node.path, name), attr)
        return self._remember(attr, parent_node, parent, name)

    async def getattr(self, ino: int) -> Attr:
        return (await self._known(ino)).attr

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, count in items:
            node = self._inodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and ino != self.root.ino:
                del self._inodes[ino]

    # ---- directories ---------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        """The directory's handle: its inode (listings are kept by inode, not per handle).

        An open starts from a fresh listing, as the master has it now; the reads that follow
        page it in, in whichever serving process the kernel sends them to.
        """
        if not (await self._known(ino)).attr.is_dir:
            raise NotADirectory("not a directory")
        self._listings.pop(ino, None)
        return ino

    async def readdir(self, ino: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from position `start` on, each with the position after it (a page at most)."""
        listing = self._listings.get(ino)
        if listing is None:
            listing = self._listings[ino] = _Listing()
            if len(self._listings) > LISTINGS:
                self._listings.popitem(last=False)
        self._listings.move_to_end(ino)
        while start >= len(listing.entries) and not listing.complete:
            after = listing.entries[-1][0] if listing.entries else None
            reply = await self.master.call(
                "readdir", dataset=self.dataset, ino=ino, after=after, limit=READDIR_PAGE
            )
            listing.entries.extend((name, Attr.from_wire(a)) for name, a in reply["entries"])
            listing.complete = not reply["more"]
        page = listing.entries[start : start + READDIR_PAGE]
        return [(name, attr, start + i + 1) for i, (name, attr) in enumerate(page)]

    def readdir_accepted(self, ino: int, name: str, attr: Attr) -> None:
        """The kernel took an entry with attributes (readdirplus): that counts as a lookup."""
        parent = self._known_now(ino)
        if parent is None:
            return
        self.meta.remember(ino, name, _child_path(parent.path, name), attr)
        if ino in self._inodes:  # else a directory another process looked up
            self._remember(attr, parent, ino, name)

    def releasedir(self, ino: int) -> None:
        """Nothing to free: the listing stays for the next reader of the directory (LRU)."""

    # ---- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> int:
        """Checks an open; the handle is the inode (reads are by inode, any process serves)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("cachefs mounts are read-only")
        node = await self._known(ino)
        if node.attr.is_dir:
            raise IsADirectory(f"{node.path} is a directory")
        return ino

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        node = await self._known(ino)
        if node.attr.is_dir:
            raise IsADirectory(f"{node.path} is a directory")
        return await self._files.read(ino, node.path, node.attr, offset, size)

    def read_now(self, ino: int, offset: int, size: int) -> bytes | memoryview | None:
        """The fast path: a small file cached in this host's RAM, answered without waiting
        (reply before awaiting anything: it may be a view of the RAM tier, DataReader.read_now)."""
        node = self._known_now(ino)
        if node is None or node.attr.is_dir:
            return None
        return self.reader.read_now(node.path, node.attr, offset, size)

    def release(self, ino: int) -> None:
        """Nothing to free: readers are per inode and bounded (fuse/reader.py)."""

    # ---- the rest ------------------------------------------------------------------------

    async def statfs(self) -> dict:
        return await self.master.call("statfs", dataset=self.dataset)

    async def listxattr(self, ino: int) -> list[str]:
        return [] if (await self._known(ino)).attr.is_dir else list(XATTRS)

    async def getxattr(self, ino: int, name: str) -> bytes:
        node = await self._known(ino)
        if node.attr.is_dir or name not in XATTRS:
            raise NoAttribute(f"no attribute {name}")
        cached, owner = await self.reader.cached_bytes(node.path, node.attr)
        return str(cached if name == XATTR_CACHED else owner or "").encode()

    async def access(self, ino: int, mode: int) -> None:
        await self._known(ino)
        if mode & os.W_OK:
            raise ReadOnly("cachefs mounts are read-only")


def _child_path(parent_path: str, name: str) -> str:
    return f"{parent_path}/{name}" if parent_path else name
