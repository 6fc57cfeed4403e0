"""What the master told a mount about its dataset, shared by the mount's serving processes.

An lmdb environment per mount (lmdb allows readers and writers in several processes): every
entry a process looked up is kept here, by (parent inode, name) and by inode with its path.
So a process can answer for an inode the kernel got from another process, and every process
can answer lookups of known names while the master is down (the dataset is a snapshot: what
the master answered stays true until a re-sync names it changed, see `drop`).

A cache, not a record: writes skip fsync, and the first process starts each mount with an
empty one.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import lmdb
import msgpack

from cachefs.meta import Attr
from cachefs.runtime import private_lmdb

MAP_SIZE = 4 << 30  # address space only: the file grows with what is written
_U64 = struct.Struct(">Q")


class MetaCache:
    def __init__(self, path: Path, *, fresh: bool = False):
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
        self.path = path
        self.env = lmdb.open(
            private_lmdb(path), mode=0o600, map_size=MAP_SIZE, max_dbs=2,
            sync=False, metasync=False, readahead=False,
        )  # fmt: skip
        self._entries = self.env.open_db(b"entries")  # parent u64 + name -> ino u64
        self._inodes = self.env.open_db(b"inodes")  # ino u64 -> [path, parent, name, attr]

    def close(self) -> None:
        self.env.close()

    def remember(self, parent: int, name: str, path: str, attr: Attr) -> None:
        """Keeps an entry the master answered (a no-op when it is known already)."""
        ino = _U64.pack(attr.ino)
        record = msgpack.packb([path, parent, name, attr.to_wire()])
        key = _U64.pack(parent) + name.encode()
        with self.env.begin() as txn:
            if txn.get(key, db=self._entries) == ino and txn.get(ino, db=self._inodes) == record:
                return
        with self.env.begin(write=True) as txn:
            old = txn.get(key, db=self._entries)
            if old is not None and old != ino:  # a re-sync gave the name a new inode
                txn.delete(old, db=self._inodes)
            txn.put(key, ino, db=self._entries)
            txn.put(ino, record, db=self._inodes)

    def remember_inode(self, path: str, attr: Attr) -> None:
        """Keeps an inode asked of the master by number (no entry: its name's parent is
        unknown here)."""
        with self.env.begin(write=True) as txn:
            txn.put(_U64.pack(attr.ino), msgpack.packb([path, 0, "", attr.to_wire()]),
                    db=self._inodes)  # fmt: skip

    def entry(self, parent: int, name: str) -> Attr | None:
        with self.env.begin() as txn:
            ino = txn.get(_U64.pack(parent) + name.encode(), db=self._entries)
            record = ino and txn.get(ino, db=self._inodes)
        return Attr.from_wire(msgpack.unpackb(record)[3]) if record else None

    def inode(self, ino: int) -> tuple[Attr, str, int, str] | None:
        """(attr, path, parent inode, name) of a known inode."""
        with self.env.begin() as txn:
            record = txn.get(_U64.pack(ino), db=self._inodes)
        if record is None:
            return None
        path, parent, name, attr = msgpack.unpackb(record)
        return Attr.from_wire(attr), path, parent, name

    def update_attr(self, attr: Attr) -> None:
        """A directory's new attributes after a re-sync (its inode stays)."""
        key = _U64.pack(attr.ino)
        with self.env.begin(write=True) as txn:
            record = txn.get(key, db=self._inodes)
            if record is not None:
                path, parent, name, _ = msgpack.unpackb(record)
                txn.put(key, msgpack.packb([path, parent, name, attr.to_wire()]), db=self._inodes)

    def drop(self, entries: list[tuple[int, str]]) -> None:
        """Forgets entries a re-sync changed and the inodes they named (a process that looked
        one up keeps it for handles already open; the others find it gone: ESTALE)."""
        with self.env.begin(write=True) as txn:
            for parent, name in entries:
                ino = txn.pop(_U64.pack(parent) + name.encode(), db=self._entries)
                if ino is not None:
                    txn.delete(ino, db=self._inodes)

    def clear(self) -> None:
        """The change log did not reach back: nothing known can be trusted."""
        with self.env.begin(write=True) as txn:
            txn.drop(self._entries, delete=False)
            txn.drop(self._inodes, delete=False)

    def entries(self) -> list[tuple[int, str]]:
        """Every (parent inode, name) kept: what the kernel may hold when the log is lost."""
        with self.env.begin() as txn, txn.cursor(db=self._entries) as cursor:
            return [
                (_U64.unpack(key[:8])[0], key[8:].decode()) for key in cursor.iternext(values=False)
            ]
