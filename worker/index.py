"""The worker's persistent index: which cache key lives in which tier slot, with its checksum.

lmdb, so a restarted worker finds its DISK cache (and its MEM cache while the /dev/shm file
survives) without refetching. Writes are not fsynced: after a crash the checksums catch slots
whose data never reached the disk.

    entries  cache key (16 bytes, + u32 block index for blocks of large files)
             -> msgpack [tier, slab, slot index, class, length, xxh3_64, dataset]
    meta     b"geometry:<tier>" -> msgpack [capacity, slab_size, class sizes]
             b"worker_id"       -> the worker's stable id
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack

from cachefs.runtime import private_dir, private_lmdb
from cachefs.worker.slab import Slot


@dataclass(frozen=True, slots=True)
class Location:
    tier: str
    slot: Slot
    length: int
    checksum: int
    dataset: str


class CacheIndex:
    def __init__(self, path: Path, *, map_size: int = 1 << 34):
        private_dir(path)
        self.env = lmdb.open(
            private_lmdb(path / "index.lmdb"), map_size=map_size, max_dbs=4, sync=False,
            metasync=False, mode=0o600,
        )  # fmt: skip
        self._entries = self.env.open_db(b"entries")
        self._meta = self.env.open_db(b"meta")

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def get_meta(self, key: str) -> object | None:
        with self.env.begin() as txn:
            raw = txn.get(key.encode(), db=self._meta)
        return msgpack.unpackb(raw) if raw is not None else None

    def set_meta(self, key: str, value: object) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), msgpack.packb(value), db=self._meta)

    def put(self, key: bytes, loc: Location) -> None:
        s = loc.slot
        record = [loc.tier, s.slab, s.index, s.size_class, loc.length, loc.checksum, loc.dataset]
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
