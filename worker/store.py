"""The worker's block store: MEM and DISK tiers, the index, eviction, checksums.

Synchronous and I/O-light (memory copies into mmap'd files), so the async layer calls it
directly. The rules:

- new data goes to MEM (or DISK when there is no MEM tier);
- what MEM evicts is demoted to DISK when a DISK tier exists; what DISK evicts is dropped;
- a DISK hit is promoted to MEM;
- every read verifies the xxh3_64 checksum; a mismatch drops the entry (the caller refetches);
- a full cache never fails a caller: `put` returns False and the data is simply not cached;
- pinned datasets are never evicted; quotas and TTLs: worker/controls.py (`self.controls`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cachefs.locality import make_token
from cachefs.meta import BLOCK_SIZE, checksum
from cachefs.worker import ramtier
from cachefs.worker.controls import DatasetControls
from cachefs.worker.eviction import Watermarks
from cachefs.worker.extents import Extent
from cachefs.worker.index import CacheIndex, Location, extent_of, geometry, geometry_key
from cachefs.worker.tier import Tier

log = logging.getLogger("cachefs.worker.store")



@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    hit_bytes: int = 0
    corrupt: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    not_stored: int = 0
    per_dataset: Counter = field(default_factory=Counter)  # dataset -> bytes
    per_dataset_files: Counter = field(default_factory=Counter)  # whole files or first blocks
    per_dataset_entries: Counter = field(default_factory=Counter)


class BlockStore:
    def __init__(
        self,
        state_dir: Path,
        *,
        mem_capacity: int,
        disk_dir: Path | None = None,
        disk_capacity: int = 0,
        shm_dir: Path = Path("/dev/shm"),
        shm_share: float = ramtier.DEFAULT_SHARE,
        high: float = 1.0,
        low: float = 0.97,
    ):
        if not mem_capacity and not (disk_dir is not None and disk_capacity):
            raise ValueError("a worker needs a MEM or a DISK tier")
        self.index = CacheIndex(state_dir)
        self.worker_id = self._worker_id()
        self.tiers: dict[str, Tier] = {}
        self.created: set[str] = set()  # tiers this start made (a failed start removes them)
        self._ram_lock: ramtier.TierLock | None = None
        try:
            self._open_tiers(mem_capacity, shm_dir, shm_share, disk_dir, disk_capacity)
        except BaseException:
            self.close(remove=self.created)
            raise
        self._order = [name for name in ("mem", "disk") if name in self.tiers]
        self._watermarks = {
            name: Watermarks(tier.capacity, high=high, low=low) for name, tier in self.tiers.items()
        }
        self._locations: dict[bytes, Location] = {}
        self.pinned: set[str] = set()
        self.counters = StoreCounters()
        self._load_index()
        self.controls = DatasetControls(self)  # the master's pin, quota and TTL per dataset

    # ---- start-up ------------------------------------------------------------------------

    def _open_tiers(self, mem_capacity, shm_dir, shm_share, disk_dir, disk_capacity) -> None:
        """The RAM tier (its share of /dev/shm checked, its lock taken: worker/ramtier.py),
        then the DISK tier; `created` names those this start made rather than reused."""
        ram = ramtier.tier_dir(shm_dir, self.worker_id) if mem_capacity else None
        ramtier.release_stale(self.index.get_meta("ram_tier"), ram)
        if ram is not None:
            ramtier.check_share(shm_dir, mem_capacity, shm_share, ram)
            self._ram_lock = ramtier.lock_tier(ram)
            self._add_tier("mem", ram / ramtier.SLAB, mem_capacity)
        self.index.set_meta("ram_tier", str(ram) if ram else None)
        if disk_dir is not None and disk_capacity:
            self._add_tier("disk", disk_dir / "disk.slab", disk_capacity)

    def _add_tier(self, name: str, path: Path, capacity: int) -> None:
        self.created.add(name)  # until it proves to be a tier of a previous run
        self.tiers[name] = Tier(name, path, capacity)
        if self.tiers[name].reused:
            self.created.discard(name)

    def _worker_id(self) -> str:
        worker_id = self.index.get_meta("worker_id")
        if worker_id is None:
            import uuid

            worker_id = uuid.uuid4().hex[:12]
            self.index.set_meta("worker_id", worker_id)
        return worker_id

    def _load_index(self) -> None:
        """Rebuilds allocators and LRU from the persisted index; drops what can't be trusted."""
        for name in ("mem", "disk"):
            tier = self.tiers.get(name)
            layout = geometry(tier.capacity) if tier else None
            if tier is None or not tier.reused or self.index.get_meta(geometry_key(name)) != layout:
                dropped = self.index.delete_tier(name)
                if dropped:
                    log.info("%s tier is new or changed: forgot %d cached entries", name, dropped)
                if layout is not None:
                    self.index.set_meta(geometry_key(name), layout)
        for key, (tier_name, start, pages, length, digest, dataset) in list(
            self.index.items_raw()
        ):
            tier = self.tiers[tier_name]
            extent = extent_of(start, pages)
            try:
                tier.allocator.claim(extent)
            except ValueError:  # overlaps another entry: neither can be trusted to be whole
                log.warning("index entry overlaps another in the %s tier: forgotten", tier_name)
                self.index.delete(key)
                continue
            loc = Location(tier_name, extent, length, digest, dataset)
            self._locations[key] = loc
            tier.stored_bytes += length
            tier.policy.insert(key, length)
            self._account(key, loc, +1)
        if self._locations:
            log.info("kept %d cached entries from the previous run", len(self._locations))

    def locality(self) -> dict:
        """Where this store's files are, for short-circuit readers on the same host."""
        tiers = {name: str(tier.path.resolve()) for name, tier in self.tiers.items()}
        return make_token(str(self.index.path.resolve()), tiers)

    def close(self, remove: Iterable[str] = ()) -> None:
        """Closes the index and the tiers; the tiers named in `remove` are deleted (a RAM
        tier's whole directory), the others stay for the next start to reuse."""
        remove = set(remove)
        self.index.close()
        for name, tier in self.tiers.items():
            tier.close()
            if name in remove and name != "mem":
                tier.path.unlink(missing_ok=True)
        if self._ram_lock is not None:
            if "mem" in remove:
                freed = self._ram_lock.remove()
                log.info("RAM tier %s removed (%s)", self._ram_lock.path, ramtier.human(freed))
            else:
                self._ram_lock.release()
            self._ram_lock = None

    # ---- reads ---------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The cached bytes, verified, or None (miss, or corrupt and now dropped)."""
        loc = self._fresh(key)
        if loc is None:
            self.counters.misses += 1
            return None
        data = self._verified(key, loc, self.tiers[loc.tier].read(loc.slot, loc.length))
        if data is not None and loc.tier != self._order[0]:
            self._promote(key, loc, data)
        return data

    def get_from_memory(self, key: bytes) -> memoryview | None:
        """`get` for an object in the RAM tier, else None: no disk I/O and no copy, so an event
        loop may call it inline (the mount's fast path).

        The view is of the tier itself: valid only until the caller's thread runs any other
        code of this store (a `put` may reuse the slot), so the caller replies with it before
        it awaits anything. Every write of a store happens on the thread that owns it.
        """
        loc = self._fresh(key)
        if loc is None or loc.tier != "mem":
            return None
        return self._verified(key, loc, self.tiers["mem"].view(loc.slot, loc.length))

    def _verified(
        self, key: bytes, loc: Location, data: bytes | memoryview
    ) -> bytes | memoryview | None:
        """`data` read from `loc` if its checksum holds (a hit), else None and dropped."""
        if checksum(data) != loc.checksum:
            self.counters.corrupt += 1
            log.warning("checksum mismatch in %s tier slot %s; dropping", loc.tier, loc.slot)
            self._drop(key, loc)
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.counters.hit_bytes += loc.length
        self.tiers[loc.tier].policy.touch(key)
        return data

    def touch(self, key: bytes) -> bool:
        """A hit seen elsewhere (a short-circuit read of the tier file): the LRU effect of `get`
        without reading the bytes; no promotion, which would cost a read and a write."""
        loc = self._fresh(key)
        if loc is None:
            return False
        self.tiers[loc.tier].policy.touch(key)
        return True

    def location(self, key: bytes) -> Location | None:
        return self._fresh(key)

    def __contains__(self, key: bytes) -> bool:
        return self._fresh(key) is not None

    def _fresh(self, key: bytes) -> Location | None:
        """The entry's location; None if absent or past its dataset's TTL (then dropped)."""
        loc = self._locations.get(key)
        if loc is not None and self.controls.expired(key, loc):
            self._drop(key, loc)
            return None
        return loc

    # ---- writes --------------------------------------------------------------------------

    def put(self, key: bytes, data: bytes | memoryview, dataset: str) -> bool:
        """Caches `data` under `key` in the first tier; False if it could not be stored."""
        if len(data) > BLOCK_SIZE:
            raise ValueError("objects larger than a block are stored as blocks")
        old = self._locations.get(key)
        if old is not None:
            self._drop(key, old)
        stored = self.controls.admit(dataset, len(data)) and self._store_in(
            self._order[0], key, data, dataset, checksum(data)
        )
        if stored:
            self.controls.stored(key, dataset)
        else:
            self.counters.not_stored += 1
        return stored

    def _store_in(self, tier_name: str, key: bytes, data, dataset: str, digest: int) -> bool:
        tier = self.tiers[tier_name]
        marks = self._watermarks[tier_name]
        if marks.needs_eviction(tier.used_bytes, len(data)):
            self._evict_down_to(tier_name, marks.target())
        slot = self._allocate(tier_name, len(data))
        if slot is None:
            return False
        tier.write(slot, data)
        tier.stored_bytes += len(data)
        loc = Location(tier_name, slot, len(data), digest, dataset)
        self.index.put(key, loc)  # data first, then the index: a crash leaves no dangling entry
        self._locations[key] = loc
        tier.policy.insert(key, len(data), pinned=dataset in self.pinned)
        self._account(key, loc, +1)
        return True

    def _allocate(self, tier_name: str, length: int) -> Extent | None:
        """Pages for `length` bytes; the coldest entries go (LRU) until a free run holds it.

        Every eviction frees exactly its entry's pages and merges them with free neighbours,
        so a full tier keeps ~97% of its bytes live (benchmarks/results.md "Retention");
        None only when every entry left is pinned."""
        tier = self.tiers[tier_name]
        extent = tier.allocator.allocate(length)
        while extent is None:
            victim = next(tier.policy.victims(), None)
            if victim is None:
                return None
            self._evict(victim)
            extent = tier.allocator.allocate(length)
        return extent

    def _evict_down_to(self, tier_name: str, target: int) -> None:
        tier = self.tiers[tier_name]
        for victim in list(tier.policy.victims()):
            if tier.used_bytes <= target:
                break
            self._evict(victim)

    def _evict(self, key: bytes) -> None:
        """Moves an entry one tier down, or drops it from the last tier."""
        loc = self._locations[key]
        self.counters.evictions += 1
        position = self._order.index(loc.tier)
        if position + 1 < len(self._order):
            data = bytes(self.tiers[loc.tier].view(loc.slot, loc.length))
            self._drop(key, loc)
            if self._store_in(self._order[position + 1], key, data, loc.dataset, loc.checksum):
                self.counters.demotions += 1
        else:
            self._drop(key, loc)

    def _promote(self, key: bytes, loc: Location, data: bytes) -> None:
        self._drop(key, loc)
        if self._store_in(self._order[0], key, data, loc.dataset, loc.checksum):
            self.counters.promotions += 1
        else:  # MEM is full of pinned data: keep it where it was (its slot was just freed)
            self._store_in(loc.tier, key, data, loc.dataset, loc.checksum)

    def _drop(self, key: bytes, loc: Location) -> None:
        self.index.delete(key)
        del self._locations[key]
        tier = self.tiers[loc.tier]
        tier.policy.remove(key)
        tier.allocator.free(loc.slot)
        tier.stored_bytes -= loc.length
        self._account(key, loc, -1)

    def _account(self, key: bytes, loc: Location, sign: int) -> None:
        self.counters.per_dataset[loc.dataset] += sign * loc.length
        self.counters.per_dataset_entries[loc.dataset] += sign
        if len(key) == 16 or key[16:] == b"\0\0\0\0":  # a whole file, or a big file's block 0
            self.counters.per_dataset_files[loc.dataset] += sign

    # ---- management ----------------------------------------------------------------------

    def evict_dataset(self, dataset: str) -> int:
        keys = [key for key, loc in self._locations.items() if loc.dataset == dataset]
        for key in keys:
            self._drop(key, self._locations[key])
        return len(keys)

    def evict_keys(self, keys: list[bytes]) -> int:
        found = [key for key in keys if key in self._locations]
        for key in found:
            self._drop(key, self._locations[key])
        return len(found)

    def set_pinned(self, dataset: str, pinned: bool) -> None:
        (self.pinned.add if pinned else self.pinned.discard)(dataset)
        for key, loc in self._locations.items():
            if loc.dataset == dataset:
                self.tiers[loc.tier].policy.set_pinned(key, pinned)

    def stats(self) -> dict:
        c = self.counters
        return {
            "tiers": {
                name: {
                    "capacity": tier.capacity,
                    "used": tier.used_bytes,
                    "stored": tier.stored_bytes,
                    "entries": len(tier.policy),
                }
                for name, tier in self.tiers.items()
            },
            "datasets": {
                ds: {
                    "bytes": c.per_dataset[ds],
                    "files": c.per_dataset_files[ds],
                    "entries": c.per_dataset_entries[ds],
                }
                for ds in c.per_dataset
                if c.per_dataset_entries[ds]
            },
            "hits": c.hits,
            "misses": c.misses,
            "hit_bytes": c.hit_bytes,
            "corrupt": c.corrupt,
            "evictions": c.evictions,
            "demotions": c.demotions,
            "promotions": c.promotions,
            "not_stored": c.not_stored,
        }
