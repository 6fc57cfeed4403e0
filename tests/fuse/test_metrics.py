"""The Prometheus endpoints answer with the named metrics after real reads and a real load."""

from __future__ import annotations

import socket
import urllib.request

from tests.fuse.conftest import make_files, read_all
from tests.procs import master_process, run_cli, worker_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Sample name with labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_embedded_mount_exports_fuse_cache_store_and_ufs_metrics(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 50, max_size=20_000, seed=21)
    port = free_port()
    # No sibling prefetch: a prefetched file's first read would be a hit, not a miss.
    mnt = mounts.embedded(source.as_uri(), "--metrics", f"127.0.0.1:{port}", "--prefetch", "0")
    assert read_all(mnt, digests) == digests
    total = sum((source / rel).stat().st_size for rel in digests)
    m = scrape(port)
    assert m['cachefs_fuse_ops_total{op="read"}'] > 0
    assert m['cachefs_fuse_ops_total{op="lookup"}'] > 0
    assert m['cachefs_fuse_op_seconds_count{op="read"}'] == m['cachefs_fuse_ops_total{op="read"}']
    assert m["cachefs_cache_miss_bytes_total"] == total  # every byte was a first read
    assert m["cachefs_ufs_read_bytes_total"] == total
    assert m['cachefs_ufs_requests_total{result="ok"}'] > 0
    assert m['cachefs_store_capacity_bytes{tier="mem"}'] == 256 << 20
    assert m['cachefs_store_used_bytes{tier="mem"}'] >= total
    # The embedded worker filled every non-empty file once; its master knows the dataset.
    nonempty = sum(1 for rel in digests if (source / rel).stat().st_size)
    assert m["cachefs_fill_seconds_count"] == nonempty
    assert m["cachefs_datasets"] == 1
    assert m['cachefs_workers{state="live"}'] == 1


def test_master_and_worker_export_load_and_cache_metrics(tmp_path):
    source = tmp_path / "source"
    make_files(source, 30, max_size=10_000, seed=22)
    master_port, worker_port = free_port(), free_port()
    master = master_process(tmp_path, "--metrics", f"127.0.0.1:{master_port}")
    master.start()
    worker = worker_process(tmp_path, master.address, "w1", "64M", "--metrics",
                            f"127.0.0.1:{worker_port}")  # fmt: skip
    try:
        worker.start()
        assert run_cli("dataset", "add", "m", source.as_uri(), "--master",
                       master.address).returncode == 0  # fmt: skip
        assert run_cli("load", "m", "--master", master.address).returncode == 0
        m = scrape(master_port)
        fetched = m['cachefs_load_files_total{dataset="m",state="fetched"}']
        cached = m.get('cachefs_load_files_total{dataset="m",state="cached"}', 0)
        assert fetched + cached == 30
        w = scrape(worker_port)
        assert w["cachefs_ufs_read_bytes_total"] > 0
        assert w['cachefs_store_used_bytes{tier="mem"}'] > 0
    finally:
        worker.stop()
        master.stop()


def test_cluster_mount_on_a_worker_host_exports_short_circuit_reads(cluster, mounts, tmp_path):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 40, max_size=20_000, seed=23)
    assert run_cli("dataset", "add", "s", source.as_uri(), "--master",
                   master.address).returncode == 0  # fmt: skip
    assert run_cli("load", "s", "--master", master.address).returncode == 0
    port = free_port()
    mnt = mounts.mount("s", "--master", master.address, "--metrics", f"127.0.0.1:{port}")
    assert read_all(mnt, digests) == digests
    m = scrape(port)
    nonempty = sum(1 for rel in digests if (source / rel).stat().st_size)  # empty: no read
    assert m['cachefs_shortcircuit_reads_total{result="hit"}'] == nonempty
    assert m['cachefs_shortcircuit_reads_total{result="fallback"}'] == 0
    total = sum((source / rel).stat().st_size for rel in digests)
    assert m["cachefs_shortcircuit_read_bytes_total"] == total
