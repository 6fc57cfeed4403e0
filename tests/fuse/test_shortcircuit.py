"""Short-circuit reads with real worker processes on this host, real lmdb indexes, real mounts.

The `cluster` fixture's workers run in this network namespace, so their locality tokens match
and a mount reads their tier files directly.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest

from cachefs.fuse.mount import pid_file
from cachefs.meta import cache_key
from cachefs.shortcircuit import ShortCircuit, _Files
from tests.fuse.conftest import make_files, read_all
from tests.procs import master_process, run_cli, worker_process

MiB = 1 << 20


def cli(master, *args):
    result = run_cli(*args, "--master", master.address, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def churn_load(master, name):
    """`cachefs load NAME` into a cache too small to keep it all: exit 3 (fetched, not all kept)
    is expected there, like 0."""
    result = run_cli("load", name, "--master", master.address, timeout=300)
    assert result.returncode in (0, 3) and " 0 failed" in result.stdout, result.stdout
    return result


def status(master) -> dict:
    return json.loads(cli(master, "status", "--json").stdout)


def worker_reads(master) -> dict[str, tuple[int, int, int]]:
    """Per worker: cache gets that hit, that missed, and cache-corrupt detections."""
    return {
        w["id"]: (w["stats"]["hits"], w["stats"]["misses"], w["stats"]["corrupt"])
        for w in status(master)["workers"]
    }


def served_hit_bytes(master, name: str) -> int:
    return sum(
        w["stats"].get("served", {}).get(name, {}).get("hit_bytes", 0)
        for w in status(master)["workers"]
    )


def tokens(master) -> dict[str, dict]:
    return {w["id"]: w["locality"] for w in status(master)["workers"]}


def add_dataset(master, source: Path, name: str = "ds") -> None:
    cli(master, "dataset", "add", name, source.as_uri())
    cli(master, "load", name)


def mount_counters(mnt: Path) -> dict:
    """The counters a mount logs when it unmounts: the sum over its serving processes."""
    text = pid_file(mnt).with_suffix(".log").read_text()
    found = re.findall(r"short-circuit reads: (\{.*\})", text)
    assert found, text[-2000:]
    total: dict[str, int] = {}
    for counters in found:
        for name, value in json.loads(counters.replace("'", '"')).items():
            total[name] = total.get(name, 0) + value
    return total


def locate(master, name: str, source: Path, rel: str):
    """(worker id, token, key, location) of a cached whole file, found as a client finds it."""
    st = (source / rel).stat()
    key = cache_key(name, rel, st.st_size, st.st_mtime_ns, None)
    for worker_id, token in tokens(master).items():
        files = _Files(token)
        try:
            loc = files.lookup(key)
        finally:
            files.close()
        if loc is not None:
            return worker_id, token, key, loc
    raise AssertionError(f"{rel} is not cached")


def test_same_host_mount_reads_loaded_files_without_worker_reads(
    cluster, mounts, tmp_path, monkeypatch
):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 400, max_size=60_000, seed=21)
    rng = random.Random(5)
    for i in range(2):  # three 4 MiB blocks each, the last one short
        (source / f"big/b{i}.bin").parent.mkdir(exist_ok=True)
        (source / f"big/b{i}.bin").write_bytes(rng.randbytes(9 * MiB + 123))
    digests.update(read_all(source, [f"big/b{i}.bin" for i in range(2)]))
    add_dataset(master, source)
    objects = sum(1 for rel in digests if (source / rel).stat().st_size) + 2 * 2  # + blocks

    before = worker_reads(master)
    monkeypatch.setenv("CACHEFS_LOG_LEVEL", "INFO")  # the mount logs its counters at unmount
    # One serving process: with several, two processes may each fetch a block the kernel
    # asks for in pieces, and the served bytes below would count it twice.
    mnt = mounts.mount("ds", "--master", master.address, "--procs", "1")
    assert read_all(mnt, digests) == digests
    assert worker_reads(master) == before  # no worker served a byte: all came from its files
    # ...yet the mount tells the workers (every 2 s) what it read: their `served` hit bytes,
    # and so the dataset's hit ratio, count the short-circuit reads.
    total = sum((source / rel).stat().st_size for rel in digests)
    deadline = time.monotonic() + 15
    while served_hit_bytes(master, "ds") != total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert served_hit_bytes(master, "ds") == total
    [ds] = status(master)["datasets"]
    assert ds["hit_ratio"] == 1.0
    assert run_cli("umount", str(mnt)).returncode == 0
    counted = mount_counters(mnt)
    assert counted["hits"] == objects and counted["fallbacks"] == 0

    # The switch: the same reads through the workers' RPC, each object one cache hit.
    monkeypatch.setenv("CACHEFS_SHORTCIRCUIT", "0")
    mnt2 = mounts.mount("ds", "--master", master.address, "--procs", "1", name="mnt2")
    assert read_all(mnt2, digests) == digests
    after = worker_reads(master)
    assert sum(after[w][0] - before[w][0] for w in after) == objects


def test_corrupt_slot_fails_its_checksum_and_is_read_through_the_worker(
    cluster, mounts, tmp_path, monkeypatch
):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 50, max_size=30_000, seed=22)
    add_dataset(master, source)
    rel = next(rel for rel in sorted(digests) if (source / rel).stat().st_size > 1000)
    worker_id, token, _, loc = locate(master, "ds", source, rel)
    with open(token["tiers"][loc.tier], "r+b") as f:  # flip one byte in the middle of the slot
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    before = worker_reads(master)
    monkeypatch.setenv("CACHEFS_LOG_LEVEL", "INFO")
    mnt = mounts.mount("ds", "--master", master.address)
    assert read_all(mnt, [rel]) == {rel: digests[rel]}
    # The worker's own check caught it too, dropped the entry and refetched from the source.
    assert worker_reads(master)[worker_id][2] == before[worker_id][2] + 1
    assert read_all(mnt, digests) == digests
    assert run_cli("umount", str(mnt)).returncode == 0
    counted = mount_counters(mnt)
    assert counted["fallbacks"] == 1 and counted["hits"] >= 1


@pytest.fixture
def small_worker(tmp_path):
    """A master and one worker whose 16 MiB RAM tier holds about one of the two datasets."""
    master = master_process(tmp_path)
    master.start()
    worker = worker_process(tmp_path, master.address, "small", "16M")
    try:
        worker.start()
        yield master
    finally:
        worker.stop()
        master.stop()


def test_reused_slots_under_many_readers_never_give_wrong_bytes(
    small_worker, tmp_path, monkeypatch
):
    """Two datasets of same-size files evict each other from the same slots while 8 threads
    read through the short-circuit reader."""
    master = small_worker
    contents: dict[bytes, bytes] = {}  # cache key -> the bytes it must read as
    for name, seed in (("a", 1), ("b", 2)):
        source = tmp_path / f"source-{name}"
        rng = random.Random(seed)
        for i in range(60):  # 12 MB: the tier cannot hold both datasets
            path = source / f"f{i:03d}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(rng.randbytes(200_000))
            st = path.stat()
            contents[cache_key(name, path.name, st.st_size, st.st_mtime_ns, None)] = (
                path.read_bytes()
            )
        cli(master, "dataset", "add", name, source.as_uri())
    churn_load(master, "a")
    [(worker_id, token)] = tokens(master).items()

    # Deterministic first: a reader preempted between its lookup and its read of the slot,
    # while the slot is freed and refilled with other bytes.
    _, _, key, loc = locate(master, "a", tmp_path / "source-a", "f000.bin")
    sc = ShortCircuit(enabled=True)
    real_fetch = _Files.fetch

    def preempted(files, located):
        cli(master, "dataset", "clean", "a")
        churn_load(master, "b")
        assert real_fetch(files, located) is None  # the slot holds b's bytes now
        return real_fetch(files, located)

    with monkeypatch.context() as patch:
        patch.setattr(_Files, "fetch", preempted)
        assert sc.read_sync(worker_id, token, key) is None
    assert sc.fallbacks == 1 and sc.hits == 0

    keys = list(contents)
    wrong: list[bytes] = []
    stop = threading.Event()

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            key = rng.choice(keys)
            data = sc.read_sync(worker_id, token, key)
            if data is not None and data != contents[key]:
                wrong.append(key)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    evictions = status(master)["workers"][0]["stats"]["evictions"]
    try:
        for _ in range(3):  # each load evicts the other dataset and refills its slots
            churn_load(master, "a")
            churn_load(master, "b")
    finally:
        stop.set()
        for t in threads:
            t.join()
        sc.close()
    assert status(master)["workers"][0]["stats"]["evictions"] > evictions + 100
    assert wrong == []
    assert sc.hits > 0 and sc.misses > 0
    print("short-circuit under churn:", sc.counters())
