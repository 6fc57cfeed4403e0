"""Prometheus metrics (`--metrics HOST:PORT` on master, worker and mount).

Names follow the Prometheus conventions: a `cachefs_` prefix, base units (bytes, seconds),
`_total` on counters, and no per-path labels (unbounded cardinality). Each process exports the
metrics of the parts it runs; gauges of the cache tiers are read at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, start_http_server
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


class _StoreCollector:
    """Tier capacity and usage of the process's worker store, read when Prometheus scrapes."""

    def __init__(self):
        self.stats: Callable[[], dict] | None = None

    def collect(self):
        if self.stats is None:
            return
        used = GaugeMetricFamily("cachefs_store_used_bytes", "Bytes of cache slots in use",
                                 labels=["tier"])  # fmt: skip
        capacity = GaugeMetricFamily("cachefs_store_capacity_bytes", "Cache tier size",
                                     labels=["tier"])  # fmt: skip
        for tier, t in self.stats()["tiers"].items():
            used.add_metric([tier], t["used"])
            capacity.add_metric([tier], t["capacity"])
        yield used
        yield capacity


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
