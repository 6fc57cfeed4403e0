"""The worker's persistent index: which cache key lives in which tier slot, with its checksum.

lmdb, so a restarted worker finds its DISK cache (and its MEM cache while the /dev/shm file
survives) without refetching. Writes are not fsynced: after a crash the checksums catch slots
whose data never reached the disk.

    entries  cache key (16 bytes, + u32 block index for blocks of large files)
             -> msgpack [tier, first page, pages, length, xxh3_64, dataset]
    meta     b"geometry:<tier>" -> msgpack ["extents", capacity, page size]
             b"worker_id"       -> the worker's stable id
             b"controls"        -> the master's per-dataset controls last received
    stored   cache key -> f64 wall-clock time it was stored (TTLs: worker/controls.py); saved
             in batches, so it may lag the entries and name keys no longer cached
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack

from cachefs.runtime import private_dir, private_lmdb
from cachefs.worker.extents import PAGE, Extent

#: Index dirs this process has open as a worker: lmdb forbids a second open in one process.
OPEN_INDEXES: set[str] = set()

ENTRIES_DB = b"entries"
META_DB = b"meta"
STAMPS_DB = b"stored"
_STAMP = struct.Struct("<d")


def geometry_key(tier: str) -> str:
    return f"geometry:{tier}"


def geometry(capacity: int) -> list:
    """What a tier's entries are located by; an index whose tier had another is forgotten."""
    return ["extents", capacity, PAGE]


def extent_of(start: int, pages: int) -> Extent:
    """The pages an index record names: the one place a record becomes a file offset (the
    worker rebuilds its allocator with it; short-circuit readers locate bytes with it)."""
    return Extent(start, pages)


@dataclass(frozen=True, slots=True)
class Location:
    tier: str
    slot: Extent  # where the bytes are: `offset`, `capacity`
    length: int
    checksum: int
    dataset: str


class CacheIndex:
    def __init__(self, path: Path, *, map_size: int = 1 << 34):
        private_dir(path)
        self.path = path / "index.lmdb"
        self.env = lmdb.open(
            private_lmdb(path / "index.lmdb"), map_size=map_size, max_dbs=4, sync=False,
            metasync=False, mode=0o600,
        )  # fmt: skip
        self._entries = self.env.open_db(ENTRIES_DB)
        self._meta = self.env.open_db(META_DB)
        self._stamps = self.env.open_db(STAMPS_DB)
        OPEN_INDEXES.add(os.path.realpath(self.path))

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
        OPEN_INDEXES.discard(os.path.realpath(self.path))

    def reader_check(self) -> int:
        """Frees reader slots of dead processes (a killed short-circuit client): a stale slot
        would keep lmdb from reusing pages and grow the file with every write."""
        return self.env.reader_check()

    def get_meta(self, key: str) -> object | None:
        with self.env.begin() as txn:
            raw = txn.get(key.encode(), db=self._meta)
        return msgpack.unpackb(raw) if raw is not None else None

    def set_meta(self, key: str, value: object) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), msgpack.packb(value), db=self._meta)

    def put(self, key: bytes, loc: Location) -> None:
        e = loc.slot
        record = [loc.tier, e.start, e.pages, loc.length, loc.checksum, loc.dataset]
        with self.env.begin(write=True) as txn:
            txn.put(key, msgpack.packb(record), db=self._entries)

    def delete(self, key: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(key, db=self._entries)

    def delete_tier(self, tier: str) -> int:
        """Forgets every entry of a tier (its file was lost or its geometry changed)."""
        doomed = [key for key, loc in self.items_raw() if loc[0] == tier]
        with self.env.begin(write=True) as txn:
            for key in doomed:
                txn.delete(key, db=self._entries)
        return len(doomed)

    def items_raw(self) -> Iterator[tuple[bytes, list]]:
        with self.env.begin() as txn:
            for key, raw in txn.cursor(self._entries):
                yield bytes(key), msgpack.unpackb(raw)

    def stamps(self) -> Iterator[tuple[bytes, float]]:
        """(cache key, time stored) as last saved."""
        with self.env.begin() as txn:
            for key, raw in txn.cursor(self._stamps):
                yield bytes(key), _STAMP.unpack(raw)[0]

    def save_stamps(self, changes: dict[bytes, float | None]) -> None:
        """Records store times (None: forgets the key's) in one transaction."""
        with self.env.begin(write=True) as txn:
            for key, stamp in changes.items():
                if stamp is None:
                    txn.delete(key, db=self._stamps)
                else:
                    txn.put(key, _STAMP.pack(stamp), db=self._stamps)
