"""Per-dataset controls on a worker (issue 17 item 3): pin, quota and TTL, as the master sets
them (master/controls.py) and sends with every register and heartbeat reply (and pushes at
once when they change).

- **pinned**: the dataset's entries are never evicted (the store's pinned set);
- **quota_bytes**: this worker's share of the dataset's quota. A put that would take the
  dataset past it first evicts the dataset's own coldest entries (never another dataset's),
  down to `QUOTA_SLACK` below the quota so the walk runs once per batch, not once per put;
  what cannot fit (pinned entries fill the quota, an object larger than it) is not cached;
- **ttl_seconds**: entries older than this since they were stored are dropped: lazily when
  they are asked for (`expired`, from the store's read path) and by a periodic sweep (`run`,
  a task of the worker's nursery; `stop` ends it).

Store times are wall-clock seconds, kept per dataset in store order (so a sweep reads only the
expired front), and persisted in the index (`CacheIndex.save_stamps`) in batches by the sweep:
a restarted worker keeps its entries' ages; an entry whose time was not saved yet counts from
the restart. The last controls received are saved in the index too, so a worker restarted
while the master is down still honours its pins and quotas.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import trio

from cachefs.errors import InvalidArgument

if TYPE_CHECKING:
    from cachefs.worker.index import Location
    from cachefs.worker.store import BlockStore

log = logging.getLogger("cachefs.worker.controls")

QUOTA_SLACK = 0.05  # a dataset at its quota is trimmed to 95 % of it
SAVE_SECONDS = 5.0  # how often store times reach the index when no TTL asks for more
SAVE_BATCH = 100_000  # store times that reach the index at once, sweep or not
MIN_SWEEP, MAX_SWEEP = 0.2, 30.0  # a TTL is swept every ttl/4 seconds, within these bounds
META_KEY = "controls"


@dataclass(frozen=True, slots=True)
class Control:
    pinned: bool = False
    quota_bytes: int | None = None  # this worker's share
    ttl_seconds: float | None = None


DEFAULT = Control()


def parse_controls(datasets: object) -> dict[str, Control]:
    """{name: {pinned, quota_bytes, ttl_seconds}} as the master sends it -> Controls (the
    defaults left out); InvalidArgument for anything else."""
    if not isinstance(datasets, dict):
        raise InvalidArgument("controls: a map of dataset names")
    out = {}
    for name, spec in datasets.items():
        if not isinstance(name, str) or not isinstance(spec, dict):
            raise InvalidArgument("controls: dataset name -> map")
        pinned = spec.get("pinned", False)
        quota = spec.get("quota_bytes")
        ttl = spec.get("ttl_seconds")
        if not isinstance(pinned, bool):
            raise InvalidArgument(f"controls of {name}: pinned is true or false")
        if quota is not None and (type(quota) is not int or quota < 0):
            raise InvalidArgument(f"controls of {name}: quota_bytes is a byte count")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0
            or not math.isfinite(ttl)
        ):  # fmt: skip
            raise InvalidArgument(f"controls of {name}: ttl_seconds is a positive number")
        control = Control(pinned, quota, None if ttl is None else float(ttl))
        if control != DEFAULT:
            out[name] = control
    return out


class DatasetControls:
    """The controls in force on one store, and the store times TTLs are measured from.

    Runs on the thread that owns the store (the worker's trio thread), like every write."""

    def __init__(self, store: BlockStore, *, clock: Callable[[], float] | None = None):
        self.store = store
        self._clock = clock or time.time
        self._controls: dict[str, Control] = {}
        self._ttl: dict[str, float] = {}
        self._source: tuple[str | None, int] = (None, -1)  # (master instance, revision)
        # dataset -> cache key -> stored at, oldest first; may hold keys no longer cached
        self._stamps: dict[str, dict[bytes, float]] = {}
        self._unsaved: dict[bytes, float | None] = {}  # None: delete the saved time
        self._stamped = 0  # keys in _stamps
        self._wake: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self.expired_entries = 0
        self.quota_evictions = 0
        self._load_stamps()
        saved = store.index.get_meta(META_KEY)
        if saved:
            try:
                self.apply(saved, save=False)
            except InvalidArgument as exc:
                log.warning("ignoring the saved dataset controls: %s", exc.message)

    # ---- what the master says ------------------------------------------------------------

    def apply(self, wire: dict | None, *, save: bool = True) -> bool:
        """Puts the master's controls in force: {"instance", "revision", "datasets": {...}};
        datasets not named get the defaults. A reply older than one already applied (same
        master instance, lower revision) is ignored. True if anything changed."""
        if not wire:
            return False
        if not isinstance(wire, dict):
            raise InvalidArgument("controls: a map")
        source = (wire.get("instance"), wire.get("revision", 0))
        if source[0] == self._source[0] and source[1] < self._source[1]:
            return False
        controls = parse_controls(wire.get("datasets", {}))
        self._source = source
        if controls == self._controls:
            return False
        old, self._controls = self._controls, controls
        self._ttl = {ds: c.ttl_seconds for ds, c in controls.items() if c.ttl_seconds}
        for name in sorted(set(old) | set(controls)):
            before, after = old.get(name, DEFAULT), controls.get(name, DEFAULT)
            if before.pinned != after.pinned:
                self.store.set_pinned(name, after.pinned)
            if after.quota_bytes is not None and after.quota_bytes != before.quota_bytes:
                self._trim(name, after.quota_bytes)
            if before != after:
                log.info("dataset %s: %s", name, asdict(after))
        if save:
            self.store.index.set_meta(META_KEY, wire)
        if self._wake is not None:
            self._wake.set()  # a new TTL may need an earlier sweep
        return True

    def get(self, dataset: str) -> Control:
        return self._controls.get(dataset, DEFAULT)

    # ---- quota ---------------------------------------------------------------------------

    def admit(self, dataset: str, length: int) -> bool:
        """Room for `length` more bytes of `dataset` within its quota, made by evicting its own
        coldest entries; False: do not cache them."""
        quota = self.get(dataset).quota_bytes
        if quota is None:
            return True
        if length > quota:
            return False
        held = self.store.counters.per_dataset[dataset]
        if held + length <= quota:
            return True
        self._trim(dataset, max(0, quota - length - int(quota * QUOTA_SLACK)))
        return self.store.counters.per_dataset[dataset] + length <= quota

    def _trim(self, dataset: str, limit: int) -> None:
        """Evicts the dataset's coldest unpinned entries until it holds at most `limit` bytes
        here: the last tier's first (its entries are the colder ones), in LRU order."""
        held = self.store.counters.per_dataset[dataset]
        if held <= limit:
            return
        locations = self.store._locations
        picked = []
        for name in reversed(list(self.store.tiers)):
            for key in self.store.tiers[name].policy.victims():  # read only: one pass
                loc = locations[key]
                if loc.dataset == dataset:
                    picked.append(key)
                    held -= loc.length
                    if held <= limit:
                        break
            if held <= limit:
                break
        self.quota_evictions += self.store.evict_keys(picked)

    # ---- TTL -----------------------------------------------------------------------------

    def stored(self, key: bytes, dataset: str) -> None:
        """A new entry (a fill, not a move between tiers): its age starts now."""
        stamps = self._stamps.setdefault(dataset, {})
        if stamps.pop(key, None) is None:  # else it moves to the young end
            self._stamped += 1
        stamps[key] = self._unsaved[key] = self._clock()
        if self._stamped > 2 * len(self.store._locations) + 4096:
            self._collect()
        if len(self._unsaved) >= SAVE_BATCH:
            self.flush()

    def expired(self, key: bytes, loc: Location) -> bool:
        """Whether a cached entry is past its dataset's TTL (the caller drops it)."""
        ttl = self._ttl.get(loc.dataset)
        if ttl is None:
            return False
        stamp = self._stamps.get(loc.dataset, {}).get(key)
        if stamp is None or self._clock() - stamp < ttl:
            return False
        self.expired_entries += 1
        return True

    def sweep(self) -> int:
        """Drops every entry past its dataset's TTL; how many."""
        now = self._clock()
        locations = self.store._locations
        dropped = 0
        for dataset, ttl in self._ttl.items():
            stamps = self._stamps.get(dataset)
            if not stamps:
                continue
            cutoff = now - ttl
            old = [k for k, _ in itertools.takewhile(lambda kv: kv[1] <= cutoff, stamps.items())]  # noqa: B023
            for key in old:
                del stamps[key]
                self._unsaved[key] = None
            self._stamped -= len(old)
            keys = [k for k in old if k in locations and locations[k].dataset == dataset]
            count = self.store.evict_keys(keys)
            if count:
                log.info("dataset %s: %d entries expired (ttl %gs)", dataset, count, ttl)
            dropped += count
        self.expired_entries += dropped
        return dropped

    def _collect(self) -> None:
        """Forgets the times of entries no longer cached (evictions do not report here); run
        once they outnumber the live entries twice: amortised O(1) per entry."""
        locations = self.store._locations
        for dataset, stamps in list(self._stamps.items()):
            gone = [k for k in stamps if k not in locations or locations[k].dataset != dataset]
            for key in gone:
                del stamps[key]
                self._unsaved[key] = None
            self._stamped -= len(gone)
            if not stamps:
                del self._stamps[dataset]

    def _load_stamps(self) -> None:
        """The saved store times of the cached entries; an entry without one starts now."""
        locations = self.store._locations
        found: dict[str, list[tuple[float, bytes]]] = {}
        stale = []
        for key, stamp in self.store.index.stamps():
            loc = locations.get(key)
            if loc is None:
                stale.append(key)
            else:
                found.setdefault(loc.dataset, []).append((stamp, key))
        now = self._clock()
        for dataset, pairs in found.items():
            self._stamps[dataset] = {key: stamp for stamp, key in sorted(pairs)}
        for key, loc in locations.items():
            stamps = self._stamps.setdefault(loc.dataset, {})
            if key not in stamps:
                stamps[key] = self._unsaved[key] = now
        self._stamped = len(locations)
        if stale:
            self.store.index.save_stamps(dict.fromkeys(stale))

    def flush(self) -> None:
        """Saves the store times changed since the last flush (one write transaction)."""
        if self._unsaved:
            unsaved, self._unsaved = self._unsaved, {}
            self.store.index.save_stamps(unsaved)

    # ---- the sweep task ------------------------------------------------------------------

    def _interval(self) -> float:
        if not self._ttl:
            return SAVE_SECONDS
        return min(max(min(self._ttl.values()) / 4, MIN_SWEEP), MAX_SWEEP)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sweeps expired entries and saves store times until `stop` (or cancellation)."""
        with trio.CancelScope() as self._scope:
            task_status.started()
            try:
                while True:
                    self._wake = trio.Event()
                    with trio.move_on_after(self._interval()):
                        await self._wake.wait()
                    self.sweep()
                    self.flush()
            finally:
                self._wake = None
                self.flush()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def stats(self) -> dict:
        return {
            "datasets": {name: asdict(c) for name, c in sorted(self._controls.items())},
            "expired": self.expired_entries,
            "quota_evictions": self.quota_evictions,
        }
