"""Prometheus metrics (`--metrics HOST:PORT` on master, worker and mount).

Names follow the Prometheus conventions: a `cachefs_` prefix, base units (bytes, seconds),
`_total` on counters, and no per-path labels (unbounded cardinality). Each process exports the
metrics of the parts it runs. Most are read from the running parts when Prometheus scrapes
(collectors below), so the data paths only update plain numbers they keep anyway. A `dataset`
label is bounded: the MAX_DATASET_LABELS largest datasets are named, the rest summed under
OTHER_DATASETS, a name no dataset can have. The list with meanings: docs/metrics.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from cachefs.config import parse_address

CACHE_HIT_BYTES = Counter("cachefs_cache_hit_bytes", "Bytes served from a worker's cache")
CACHE_MISS_BYTES = Counter("cachefs_cache_miss_bytes", "Bytes served after a remote fill")
UFS_READ_BYTES = Counter("cachefs_ufs_read_bytes", "Bytes read from the remote store")
UFS_REQUESTS = Counter(
    "cachefs_ufs_requests", "Remote store calls by outcome", ["result"]
)  # result: ok, retried, error
FUSE_OP_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
LOAD_FILES = Counter(
    "cachefs_load_files", "Files handled by load jobs", ["dataset", "state"]
)  # state: fetched, cached, failed
FILL_SECONDS = Histogram(
    "cachefs_fill_seconds",
    "Time a worker takes to fill a cache miss from the remote store (waiting for a fill slot "
    "included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MAX_DATASET_LABELS = 64
OTHER_DATASETS = "/other"  # dataset names never contain "/"
JOB_STATES = ("pending", "running", "scheduled", "done", "failed", "cancelled")
#: The store's event counters (worker/store.py StoreCounters) and their metric names.
STORE_EVENTS = (
    ("evictions", "cachefs_evictions",
     "Entries evicted from a cache tier (from MEM they are demoted to DISK when it has room)"),
    ("demotions", "cachefs_demotions", "Entries evicted from MEM and kept on DISK"),
    ("promotions", "cachefs_promotions", "DISK hits moved back to MEM"),
    ("corrupt", "cachefs_corrupt_entries",
     "Cached entries whose checksum failed on read (dropped; the read refetches)"),
    ("not_stored", "cachefs_not_stored",
     "Fills served but not cached (a quota refused them, or only pinned entries could go)"),
)  # fmt: skip


def capped(values: dict[str, float]) -> list[tuple[str, float]]:
    """(dataset, value) of the MAX_DATASET_LABELS largest, the rest summed as OTHER_DATASETS."""
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) <= MAX_DATASET_LABELS:
        return ranked
    rest = sum(value for _, value in ranked[MAX_DATASET_LABELS:])
    return [*ranked[:MAX_DATASET_LABELS], (OTHER_DATASETS, rest)]


def _read(source: Callable[[], dict]) -> dict:
    """`source()` from the scrape thread: it iterates dicts the serving thread may be growing
    at that moment ("changed size during iteration"); another try then succeeds."""
    for _ in range(4):
        try:
            return source()
        except RuntimeError:
            continue
    return source()


class _StoreCollector:
    """The process's worker store, read when Prometheus scrapes: tier capacity and usage, the
    store's event counters and each dataset's cached bytes (BlockStore.stats)."""

    def __init__(self):
        self.stats: Callable[[], dict] | None = None

    def collect(self):
        if self.stats is None:
            return
        stats = _read(self.stats)
        used = GaugeMetricFamily("cachefs_store_used_bytes", "Bytes of cache slots in use",
                                 labels=["tier"])  # fmt: skip
        capacity = GaugeMetricFamily("cachefs_store_capacity_bytes", "Cache tier size",
                                     labels=["tier"])  # fmt: skip
        for tier, t in stats["tiers"].items():
            used.add_metric([tier], t["used"])
            capacity.add_metric([tier], t["capacity"])
        yield used
        yield capacity
        for key, name, help_text in STORE_EVENTS:
            yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))
        cached = GaugeMetricFamily(
            "cachefs_cached_bytes",
            "Bytes of a dataset in this worker's cache, all tiers (beyond "
            f"{MAX_DATASET_LABELS} datasets the smallest are summed as {OTHER_DATASETS})",
            labels=["dataset"],
        )
        per_dataset = {ds: d["bytes"] for ds, d in stats.get("datasets", {}).items()}
        for dataset, value in capped(per_dataset):
            cached.add_metric([dataset], value)
        yield cached


_STORE = _StoreCollector()
REGISTRY.register(_STORE)


class OpLatency:
    """One op's latency histogram as plain numbers: a bucket count per bound (+Inf last)."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs in that bound's bucket (le is <=)
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class FuseOpStats:
    """Counts and latencies of FUSE ops, exported as `cachefs_fuse_ops_total` and
    `cachefs_fuse_op_seconds` when Prometheus scrapes.

    prometheus_client takes a lock per `inc`/`observe` (~1.2 µs per op for a counter and a
    histogram); the mount's event loop is the only writer here, so plain ints do. A scrape
    (another thread) copies each op's buckets at once and derives the count from that copy, so
    the count, the +Inf bucket and the op counter always agree.
    """

    def __init__(self, bounds: tuple[float, ...] = FUSE_OP_BUCKETS):
        self.bounds = bounds
        self.ops: dict[str, OpLatency] = {}
        # Snapshots of the mount's other serving processes (fuse/serving.py), added per scrape.
        self.reports: Callable[[], list[dict]] = list

    def op(self, name: str) -> OpLatency:
        return self.ops.setdefault(name, OpLatency(self.bounds))

    def snapshot(self) -> dict[str, list]:
        """op -> [count per bucket..., sum]: what a helper process reports to the first one."""
        return {name: [*stat.buckets, stat.sum] for name, stat in list(self.ops.items())}

    def totals(self) -> dict[str, tuple[list[int], float]]:
        """This process's ops plus the reported ones: op -> (count per bucket, sum)."""
        out = {name: (list(stat.buckets), stat.sum) for name, stat in list(self.ops.items())}
        for report in self.reports():
            for name, values in report.items():
                buckets, total = out.get(name, ([0] * (len(self.bounds) + 1), 0.0))
                if len(values) != len(buckets) + 1:
                    continue  # another version's buckets: not addable
                out[name] = ([a + b for a, b in zip(buckets, values, strict=False)],
                             total + values[-1])  # fmt: skip
        return out

    def collect(self):
        ops = CounterMetricFamily("cachefs_fuse_ops", "FUSE operations by name", labels=["op"])
        seconds = HistogramMetricFamily(
            "cachefs_fuse_op_seconds", "FUSE operation latency", labels=["op"]
        )
        for name, (buckets, total) in self.totals().items():
            cumulative, running = [], 0
            for bound, n in zip((*self.bounds, float("inf")), buckets, strict=True):
                running += n
                cumulative.append((floatToGoString(bound), running))
            ops.add_metric([name], running)
            seconds.add_metric([name], cumulative, total)
        yield ops
        yield seconds


FUSE_OPS = FuseOpStats()
REGISTRY.register(FUSE_OPS)


class _ShortCircuitCollector:
    """A mount's same-host reads from workers' files (cachefs.shortcircuit), read at scrape."""

    def __init__(self):
        self.counters: Callable[[], dict] | None = None

    def collect(self):
        if self.counters is None:
            return
        c = self.counters()
        reads = CounterMetricFamily(
            "cachefs_shortcircuit_reads",
            "Same-host reads of cached objects from a worker's files by outcome "
            "(miss and fallback are then read over the RPC)",
            labels=["result"],
        )
        for result in ("hit", "miss", "fallback"):
            reads.add_metric([result], c[result + "es" if result == "miss" else result + "s"])
        yield reads
        yield CounterMetricFamily(
            "cachefs_shortcircuit_read_bytes",
            "Bytes read from a same-host worker's files",
            value=c["hit_bytes"],
        )


_SHORTCIRCUIT = _ShortCircuitCollector()
REGISTRY.register(_SHORTCIRCUIT)


class ReadFallbacks:
    """A client's reads that left their first source: a failed worker's read went to the
    next-ranked worker, or the read went to the remote store directly (every worker failed, or
    none was live). Plain ints the client's event loop updates; `reports` adds the counts of
    a mount's other serving processes (fuse/serving.py), as FuseOpStats does."""

    SOURCES = ("next_worker", "store")

    def __init__(self):
        self.counts = dict.fromkeys(self.SOURCES, 0)
        self.reports: Callable[[], list[dict]] = list

    def add(self, to: str) -> None:
        self.counts[to] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def collect(self):
        totals = dict(self.counts)
        for report in self.reports():
            for source in self.SOURCES:
                value = report.get(source, 0) if isinstance(report, dict) else 0
                totals[source] += value if isinstance(value, int) else 0
        family = CounterMetricFamily(
            "cachefs_read_fallbacks",
            "Client reads that fell back from a failed worker: to the next-ranked worker, or "
            "to the remote store directly",
            labels=["to"],
        )
        for source in self.SOURCES:
            family.add_metric([source], totals[source])
        yield family


READ_FALLBACKS = ReadFallbacks()
REGISTRY.register(READ_FALLBACKS)


class _MasterCollector:
    """The master's datasets, workers and jobs, read when Prometheus scrapes
    (MasterService.gauges)."""

    def __init__(self):
        self.gauges: Callable[[], dict] | None = None

    def collect(self):
        if self.gauges is None:
            return
        g = _read(self.gauges)
        yield GaugeMetricFamily(
            "cachefs_datasets", "Datasets registered on the master", value=len(g["datasets"])
        )
        files = GaugeMetricFamily(
            "cachefs_dataset_files",
            f"Files in a dataset's namespace snapshot (beyond {MAX_DATASET_LABELS} datasets "
            f"the smallest are summed as {OTHER_DATASETS})",
            labels=["dataset"],
        )
        for dataset, value in capped({n: d["files"] for n, d in g["datasets"].items()}):
            files.add_metric([dataset], value)
        yield files
        size = GaugeMetricFamily(
            "cachefs_dataset_bytes",
            "Bytes of a dataset's files in the remote store as of its last sync (named as in "
            "cachefs_dataset_files)",
            labels=["dataset"],
        )
        for dataset, value in capped({n: d["bytes"] for n, d in g["datasets"].items()}):
            size.add_metric([dataset], value)
        yield size
        workers = GaugeMetricFamily(
            "cachefs_workers",
            "Worker members by state (late: no heartbeat for half the liveness timeout; "
            "dropped once silent for all of it)",
            labels=["state"],
        )
        for state in ("live", "late"):
            workers.add_metric([state], g["workers"].get(state, 0))
        yield workers
        jobs = GaugeMetricFamily("cachefs_jobs", "Load jobs by state", labels=["state"])
        for state in dict.fromkeys((*JOB_STATES, *sorted(g["jobs"]))):
            jobs.add_metric([state], g["jobs"].get(state, 0))
        yield jobs


_MASTER = _MasterCollector()
REGISTRY.register(_MASTER)


def export_master(gauges: Callable[[], dict] | None) -> None:
    """Makes the master gauges read this master's state (one master per process); None: none."""
    _MASTER.gauges = gauges


def export_shortcircuit(counters: Callable[[], dict]) -> None:
    """Makes the short-circuit counters read this mount's reader (one mount per process)."""
    _SHORTCIRCUIT.counters = counters


def export_store(stats: Callable[[], dict]) -> None:
    """Makes the store gauges read this worker's stats (one worker per process)."""
    _STORE.stats = stats


def serve(address: str | None) -> None:
    """Starts the /metrics HTTP endpoint in a daemon thread (no-op without an address)."""
    if address:
        host, port = parse_address(address)
        start_http_server(port, addr=host)
