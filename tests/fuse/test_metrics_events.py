"""The cache's events, the clients' fallbacks and the master's counts on `/metrics`, each read
after real processes provoked it: a worker too small for its dataset (evictions, demotions), a
read of a demoted entry (promotion), a slot corrupted in its tier file, workers killed under a
mount (fallbacks to the next worker, then to the store; late workers on the master)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

from cachefs.client import Client
from cachefs.meta import cache_key
from cachefs.shortcircuit import Located, _Files
from tests.fuse.conftest import read_all
from tests.fuse.test_metrics import free_port, scrape
from tests.procs import ServiceProcess, master_process, run_cli, worker_process

FILES, SIZE = 80, 200_000  # 16 MB: twice the worker's 8 MiB RAM tier


def make_dataset(root: Path, count: int, size: int, seed: int) -> dict[str, str]:
    """`count` files of `size` random bytes in directories of 20; rel -> sha256."""
    rng = random.Random(seed)
    digests = {}
    for i in range(count):
        rel = f"d{i // 20:02d}/f{i:03d}.bin"
        data = rng.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def cli(master: ServiceProcess, *args: str, ok=(0,)):
    result = run_cli(*args, "--master", master.address, timeout=300)
    assert result.returncode in ok, result.stdout + result.stderr
    return result


def locations(master: ServiceProcess, name: str, source: Path) -> dict[str, tuple[dict, Located]]:
    """rel -> (the worker's locality token, where its entry is), found as a client finds it."""
    status = json.loads(cli(master, "status", "--json").stdout)
    found = {}
    for worker in status["workers"]:
        files = _Files(worker["locality"])
        try:
            for path in sorted(source.rglob("*.bin")):
                rel = path.relative_to(source).as_posix()
                st = path.stat()
                loc = files.lookup(cache_key(name, rel, st.st_size, st.st_mtime_ns, None))
                if loc is not None:
                    found[rel] = (worker["locality"], loc)
        finally:
            files.close()
    return found


def wait_for(port: int, check, timeout: float = 30.0) -> dict[str, float]:
    """Scrapes until `check(samples)` holds; the last samples either way (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_worker_and_master_export_cache_events_fills_and_counts(tmp_path, monkeypatch):
    # The reads below go to the worker, which verifies, promotes and counts: not to its files.
    monkeypatch.setenv("CACHEFS_SHORTCIRCUIT", "0")
    master_port, worker_port = free_port(), free_port()
    master = master_process(tmp_path, "--metrics", f"127.0.0.1:{master_port}")
    master.start()
    worker = worker_process(
        tmp_path, master.address, "w1", "8M", "--disk", str(tmp_path / "disk"),
        "--disk-size", "16M", "--metrics", f"127.0.0.1:{worker_port}",
    )  # fmt: skip
    try:
        worker.start()
        source = tmp_path / "source"
        digests = make_dataset(source, FILES, SIZE, seed=31)
        cli(master, "dataset", "add", "a", source.as_uri())
        cli(master, "load", "a", ok=(0, 3))  # 3: fetched, not all kept

        w = scrape(worker_port)
        assert w["cachefs_evictions_total"] > 0  # MEM overflowed ...
        assert 0 < w["cachefs_demotions_total"] <= w["cachefs_evictions_total"]  # ... onto DISK
        assert w["cachefs_promotions_total"] == 0
        assert w["cachefs_corrupt_entries_total"] == 0
        assert w["cachefs_fill_seconds_count"] == FILES  # one fill per file
        assert w['cachefs_fill_seconds_bucket{le="+Inf"}'] == FILES
        assert w["cachefs_fill_seconds_sum"] > 0
        status = json.loads(cli(master, "status", "--json").stdout)
        [stored] = [d["stored_bytes"] for d in status["datasets"] if d["name"] == "a"]
        assert 0 < w['cachefs_cached_bytes{dataset="a"}'] == stored <= FILES * SIZE

        m = scrape(master_port)
        assert m["cachefs_datasets"] == 1
        assert m['cachefs_dataset_files{dataset="a"}'] == FILES
        assert m['cachefs_dataset_bytes{dataset="a"}'] == FILES * SIZE
        assert m['cachefs_workers{state="live"}'] == 1
        assert m['cachefs_workers{state="late"}'] == 0
        assert m['cachefs_jobs{state="done"}'] == 1
        assert m['cachefs_jobs{state="running"}'] == m['cachefs_jobs{state="failed"}'] == 0

        with Client(master.address) as client:
            # A byte flipped in a RAM tier slot: the worker's check drops it and refetches.
            rel, (token, loc) = next(
                (rel, found) for rel, found in locations(master, "a", source).items()
                if found[1].tier == "mem"
            )  # fmt: skip
            with open(token["tiers"]["mem"], "r+b") as f:
                f.seek(loc.offset + loc.length // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
            assert hashlib.sha256(client.read_bytes("a", rel)).hexdigest() == digests[rel]
            w = scrape(worker_port)
            assert w["cachefs_corrupt_entries_total"] == 1
            assert w["cachefs_fill_seconds_count"] == FILES + 1  # the refetch

            # A DISK hit goes back to MEM.
            rel = next(rel for rel, (_, loc) in locations(master, "a", source).items()
                       if loc.tier == "disk")  # fmt: skip
            assert hashlib.sha256(client.read_bytes("a", rel)).hexdigest() == digests[rel]
            w = scrape(worker_port)
            assert w["cachefs_promotions_total"] == 1
            assert w["cachefs_fill_seconds_count"] == FILES + 1  # a hit: no fill
            assert locations(master, "a", source)[rel][1].tier == "mem"
    finally:
        worker.stop()
        master.stop()


def test_mount_exports_read_fallbacks_and_master_counts_late_workers(mounts, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    # A killed worker's tier files outlive it: same-host reads of them would need no fallback.
    monkeypatch.setenv("CACHEFS_SHORTCIRCUIT", "0")
    master_port, mount_port = free_port(), free_port()
    master = master_process(tmp_path, "--metrics", f"127.0.0.1:{master_port}", "--liveness", "6")
    master.start()
    workers = [worker_process(tmp_path, master.address, name, "64M") for name in ("w1", "w2")]
    try:
        for worker in workers:
            worker.start()
        source = tmp_path / "source"
        digests = make_dataset(source, 60, 10_000, seed=32)
        cli(master, "dataset", "add", "f", source.as_uri())
        m = scrape(master_port)
        assert m['cachefs_workers{state="live"}'] == 2
        mnt = mounts.mount("f", "--master", master.address, "--metrics",
                           f"127.0.0.1:{mount_port}", "--procs", "1",
                           "--prefetch", "0")  # fmt: skip
        rels = sorted(digests)
        first, second = rels[:30], rels[30:]

        # w1 dies; the master still lists it: reads it owns fail over to w2.
        workers[0].stop(signal.SIGKILL)
        assert read_all(mnt, first) == {rel: digests[rel] for rel in first}
        c = scrape(mount_port)
        assert c['cachefs_read_fallbacks_total{to="next_worker"}'] >= 1
        assert c['cachefs_read_fallbacks_total{to="store"}'] == 0

        # Silent for half the liveness timeout: late; for all of it: dropped.
        m = wait_for(master_port, lambda s: s['cachefs_workers{state="late"}'] == 1)
        assert m['cachefs_workers{state="late"}'] == 1 and m['cachefs_workers{state="live"}'] == 1
        m = wait_for(master_port, lambda s: s['cachefs_workers{state="late"}'] == 0)
        assert m['cachefs_workers{state="late"}'] == 0 and m['cachefs_workers{state="live"}'] == 1

        # w2 dies too: every read goes to the store itself, once per file. First the mount
        # forgets w1 (its worker list is refreshed every 2 s), so only w2 is tried before.
        time.sleep(3)
        workers[1].stop(signal.SIGKILL)
        assert read_all(mnt, second) == {rel: digests[rel] for rel in second}
        after = scrape(mount_port)
        assert after['cachefs_read_fallbacks_total{to="store"}'] == len(second)
        assert (after['cachefs_read_fallbacks_total{to="next_worker"}']
                == c['cachefs_read_fallbacks_total{to="next_worker"}'])  # fmt: skip
    finally:
        for worker in workers:
            worker.stop()
        master.stop()


def test_fills_the_cache_could_not_keep_are_counted(tmp_path):
    """A fill served but not cached counts as not stored: here a pinned dataset at its quota
    (its own entries may not make room)."""
    master = master_process(tmp_path)
    master.start()
    worker_port = free_port()
    worker = worker_process(tmp_path, master.address, "w1", "64M",
                            "--metrics", f"127.0.0.1:{worker_port}")  # fmt: skip
    try:
        worker.start()
        make_dataset(tmp_path / "source", 20, SIZE, seed=5)  # 4 MB
        cli(master, "dataset", "add", "q", (tmp_path / "source").as_uri())
        assert scrape(worker_port)["cachefs_not_stored_total"] == 0
        cli(master, "dataset", "pin", "q")
        cli(master, "dataset", "set", "q", "--quota", "1M")
        cli(master, "load", "q", ok=(3,))  # fetched, not all kept: the quota
        w = scrape(worker_port)
        stats = json.loads(cli(master, "status", "--json").stdout)["workers"][0]["stats"]
        assert w["cachefs_not_stored_total"] >= 15  # at most 5 of 20 fit in 1 MiB
        assert w["cachefs_not_stored_total"] == stats["not_stored"]
    finally:
        worker.stop()
        master.stop()
