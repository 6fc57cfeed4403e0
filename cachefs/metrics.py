"""Prometheus metrics (`--metrics HOST:PORT` on master, worker and mount).

Names follow the Prometheus conventions: a `cachefs_` prefix, base units (bytes, seconds),
`_total` on counters, and no per-path labels (unbounded cardinality). Each process exports the
metrics of the parts it runs; gauges of the cache tiers are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from cachefs.config import parse_address

CACHE_HIT_BYTES = Counter("cachefs_cache_hit_bytes", "Bytes served from a worker's cache")
CACHE_MISS_BYTES = Counter("cachefs_cache_miss_bytes", "Bytes served after a remote fill")
UFS_READ_BYTES = Counter("cachefs_ufs_read_bytes", "Bytes read from the remote store")
UFS_REQUESTS = Counter(
    "cachefs_ufs_requests", "Remote store calls by outcome", ["result"]
)  # result: ok, retried, error
FUSE_OPS = Counter("cachefs_fuse_ops", "FUSE operations by name", ["op"])
FUSE_OP_SECONDS = Histogram(
    "cachefs_fuse_op_seconds",
    "FUSE operation latency",
    ["op"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
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


def export_store(stats: Callable[[], dict]) -> None:
    """Makes the store gauges read this worker's stats (one worker per process)."""
    _STORE.stats = stats


def serve(address: str | None) -> None:
    """Starts the /metrics HTTP endpoint in a daemon thread (no-op without an address)."""
    if address:
        host, port = parse_address(address)
        start_http_server(port, addr=host)
