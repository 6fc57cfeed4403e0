"""Preload, periodic jobs, status, affinity and sync-driven invalidation, with real processes,
a real S3 server behind a counting/fault-injecting proxy, and real mounts."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from tests.fuse.conftest import make_files, read_all
from tests.procs import run_cli
from tests.store_proxy import StoreProxy


def cli(master, *args, timeout=300):
    return run_cli(*args, "--master", master.address, timeout=timeout)


def upload(moto_server, source, digests, prefix="data"):
    bucket = moto_server.create_bucket()
    moto_server.upload(bucket, {f"{prefix}/{rel}": (source / rel).read_bytes() for rel in digests})
    return bucket


def add_s3_dataset(master, name, bucket, proxy, prefix="data"):
    options = [f"-o{k}={v}" for k, v in proxy.options.items()]
    result = cli(master, "dataset", "add", name, f"s3://{bucket}/{prefix}", *options)
    assert result.returncode == 0, result.stderr


def s3_dataset(master, moto_server, proxy, name, source, digests) -> str:
    """The files of `digests` in a new bucket, added as dataset `name` through `proxy`."""
    bucket = upload(moto_server, source, digests)
    add_s3_dataset(master, name, bucket, proxy)
    return bucket


def status(master) -> dict:
    result = cli(master, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_loaded_dataset_is_served_with_the_store_gone(cluster, mounts, tmp_path, moto_server):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 600, max_size=40_000, seed=11)
    proxy = StoreProxy(moto_server.endpoint)
    try:
        add_s3_dataset(master, "ds", upload(moto_server, source, digests), proxy)
        empty = sum(1 for rel in digests if not (source / rel).stat().st_size)  # nothing to fetch
        check = cli(master, "load", "ds", "--check")
        assert f"{empty}/600 files cached" in check.stdout and "(0.0%)" in check.stdout
        loaded = cli(master, "load", "ds")
        assert loaded.returncode == 0, loaded.stderr
        assert "600/600 files" in loaded.stdout and "0 failed" in loaded.stdout
        fetched = proxy.counts()["gets"]
        assert len(proxy.gets()) == 600 - empty  # each file with data fetched,
        assert fetched <= 1.05 * (600 - empty)  # once, but for hedges of slow GETs
        again = cli(master, "load", "ds")  # re-running fetches nothing
        assert "600 already cached" in again.stdout
        assert proxy.counts()["gets"] == fetched
        check = cli(master, "load", "ds", "--check")
        assert "600/600 files cached (100.0%)" in check.stdout

        total = sum((source / rel).stat().st_size for rel in digests)
        info = status(master)["datasets"][0]
        assert info["cached_bytes"] == total and info["cached_percent"] == 100.0
        worker_bytes = sum(w["stats"]["datasets"]["ds"]["bytes"] for w in status(master)["workers"])
        assert worker_bytes == total
    finally:
        proxy.stop()  # the store is gone from here on
    mnt = mounts.mount("ds", "--master", master.address)
    assert read_all(mnt, digests) == digests


def test_load_over_a_flaky_store_completes(cluster, tmp_path, moto_server):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 300, max_size=20_000, seed=12)
    proxy = StoreProxy(moto_server.endpoint)
    try:
        add_s3_dataset(master, "flaky", upload(moto_server, source, digests), proxy)
        proxy.set(fail_rate=0.2)
        submitted = cli(master, "load", "flaky", "--no-wait")
        job_id = int(submitted.stdout.split()[1])
        seen = []
        while True:  # progress only grows and ends at the totals
            job = json.loads(cli(master, "status", "--json").stdout)["jobs"][-1]
            assert job["id"] == job_id
            seen.append(job["progress"])
            if job["state"] not in ("pending", "running"):
                break
            time.sleep(0.1)  # polling a job's progress, as a user would
        for before, after in zip(seen, seen[1:], strict=False):
            for key in ("done_files", "done_bytes", "failed_files"):
                assert after[key] >= before[key]
        final = seen[-1]
        assert job["state"] == "done"
        assert final["done_files"] + final["failed_files"] == final["files"] == 300
        assert final["failed_files"] == len(job["failures"])  # exact failures, if any
        assert proxy.counts()["failed"] > 0  # faults really happened
    finally:
        proxy.stop()


def test_periodic_job_fetches_only_changes_and_survives_restart(cluster, tmp_path, moto_server):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 100, max_size=8000, seed=13)
    proxy = StoreProxy(moto_server.endpoint)
    try:
        bucket = upload(moto_server, source, digests)
        add_s3_dataset(master, "daily", bucket, proxy)
        submitted = cli(master, "load", "daily", "--every", "2s")
        assert "periodic" in submitted.stdout

        def wait_runs(n):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = status(master)["jobs"][0]
                if job["runs"] >= n and job["state"] == "scheduled":
                    return job
                time.sleep(0.2)  # polling the schedule from outside
            raise AssertionError(f"job did not reach {n} runs: {job}")

        wait_runs(1)
        empty = sum(1 for rel in digests if not (source / rel).stat().st_size)
        assert len(proxy.gets()) == 100 - empty  # every file with data fetched
        changed = sorted(digests)[:3]
        moto_server.upload(bucket, {f"data/{rel}": b"changed " + rel.encode() for rel in changed})
        before = proxy.gets()
        job = wait_runs(3)  # a full run after the change, whatever run was in flight
        assert job["sync"] is not None
        fetched = proxy.gets() - before  # only the changed files (once each, or hedged)
        assert {k.split("/", 1)[1] for k in fetched} == {f"data/{rel}" for rel in changed}

        master.stop()
        master.start()
        runs = status(master)["jobs"][0]["runs"]
        wait_runs(runs + 1)  # the schedule resumed after the restart
        cancelled = cli(master, "job", "cancel", "1")
        assert "cancelled" in cancelled.stdout
    finally:
        proxy.stop()


def test_sync_invalidates_mount_without_mixing_versions(cluster, mounts, tmp_path):
    master, _ = cluster
    source = tmp_path / "source"
    (source / "d").mkdir(parents=True)
    (source / "d" / "f.bin").write_bytes(b"A" * 100_000)
    (source / "d" / "gone.bin").write_bytes(b"bye")
    assert cli(master, "dataset", "add", "live", source.as_uri()).returncode == 0
    mnt = mounts.mount("live", "--master", master.address)
    old_handle = open(mnt / "d" / "f.bin", "rb")  # noqa: SIM115 - held open across the sync
    try:
        assert old_handle.read(10) == b"A" * 10
        assert (mnt / "d" / "gone.bin").read_bytes() == b"bye"
        (source / "d" / "f.bin").write_bytes(b"B" * 120_000)
        os.utime(source / "d" / "f.bin", (time.time() + 50, time.time() + 50))
        (source / "d" / "gone.bin").unlink()
        (source / "d" / "new.bin").write_bytes(b"hello")
        synced = cli(master, "dataset", "sync", "live")
        assert "added 1, changed 1, removed 1" in synced.stdout

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # mounts poll for re-syncs every 2 s
            if (mnt / "d" / "f.bin").stat().st_size == 120_000:
                break
            time.sleep(0.2)
        assert (mnt / "d" / "f.bin").read_bytes() == b"B" * 120_000  # a new open: new version
        old_rest = old_handle.read()
        assert old_rest == b"A" * (100_000 - 10)  # the old handle: old version, unmixed
        assert not (mnt / "d" / "gone.bin").exists()
        assert (mnt / "d" / "new.bin").read_bytes() == b"hello"
        assert sorted(os.listdir(mnt / "d")) == ["f.bin", "new.bin"]
    finally:
        old_handle.close()


def test_clean_affinity_and_status(cluster, tmp_path):
    master, workers = cluster
    source = tmp_path / "source"
    digests = make_files(source, 200, max_size=10_000, seed=14)
    assert cli(master, "dataset", "add", "aff", source.as_uri()).returncode == 0
    assert cli(master, "load", "aff").returncode == 0
    ranked = cli(master, "affinity", "aff")
    assert ranked.returncode == 0 and ranked.stdout.count("\n") == 2
    assert {line.split()[0] for line in ranked.stdout.splitlines()} == {"w1", "w2"}
    k8s = cli(master, "affinity", "aff", "--k8s")
    assert "preferredDuringSchedulingIgnoredDuringExecution" in k8s.stdout
    assert "kubernetes.io/hostname" in k8s.stdout
    text = cli(master, "status")
    assert "aff" in text.stdout and "100.0% cached" in text.stdout
    with_data = sum(1 for rel in digests if (source / rel).stat().st_size)  # empty: not cached
    cleaned = cli(master, "dataset", "clean", "aff")
    assert f"{with_data} cache entries dropped on 2 workers" in cleaned.stdout
    assert status(master)["datasets"][0]["cached_bytes"] == 0


def test_replicas_file_lists_metadata_only_and_bad_schedules(cluster, tmp_path):
    master, workers = cluster
    source = tmp_path / "source"
    digests = make_files(source, 40, max_size=5000, seed=15)
    assert cli(master, "dataset", "add", "rep", source.as_uri()).returncode == 0
    chosen = [rel for rel in sorted(digests) if (source / rel).stat().st_size][:10]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(chosen) + "\n")
    loaded = cli(master, "load", "rep", "--files", str(listing), "--replicas", "2")
    assert loaded.returncode == 0, loaded.stderr
    assert "20/20 files" in loaded.stdout  # 10 files × 2 copies
    per_worker = [w["stats"]["datasets"]["rep"]["files"] for w in status(master)["workers"]]
    assert per_worker == [10, 10]  # each file on both workers

    check = cli(master, "load", "rep", "c000/v00001", "--check")
    assert "/10 files cached" in check.stdout

    (source / "extra.bin").write_bytes(b"x")
    meta = cli(master, "load", "rep", "--metadata-only")
    assert meta.returncode == 0 and "0/0 files" in meta.stdout
    assert status(master)["datasets"][0]["files"] == 41

    bad = cli(master, "load", "rep", "--cron", "not a cron")
    assert bad.returncode == 2 and "invalid cron expression" in bad.stderr
    both = cli(master, "load", "rep", "--cron", "* * * * *", "--every", "5m")
    assert both.returncode == 2 and "not both" in both.stderr
    cron = cli(master, "load", "rep", "--cron", "0 3 * * *")
    assert "periodic" in cron.stdout
    jobs = cli(master, "job", "ls")
    assert "cron '0 3 * * *'" in jobs.stdout


def test_a_read_waiting_on_the_store_holds_up_no_other_read(cluster, mounts, tmp_path, moto_server):
    """One serving process (the patched pyfuse3 loop starts another task only for a handler
    that waits): while a read of an uncached file waits on a stalled store, first reads of
    cached files through the same process are answered."""
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 60, max_size=30_000, seed=14)
    proxy = StoreProxy(moto_server.endpoint)
    try:
        bucket = s3_dataset(master, moto_server, proxy, "ds", source, digests)
        assert cli(master, "load", "ds").returncode == 0  # every file in the worker's cache
        moto_server.upload(bucket, {"data/late.bin": b"l" * 25_000})
        assert "added 1" in cli(master, "dataset", "sync", "ds").stdout  # known, not cached
        mnt = mounts.mount("ds", "--master", master.address, "--procs", "1")

        proxy.set(delay=8.0)  # every store answer from here on
        asked = proxy.counts()["requests"]
        late: dict = {}
        waiting = threading.Thread(target=lambda: late.update(read_all(mnt, ["late.bin"])))
        waiting.start()
        deadline = time.monotonic() + 30
        while proxy.counts()["requests"] == asked:  # the worker's fill reached the stalled store
            assert time.monotonic() < deadline, "the uncached read never reached the store"
            time.sleep(0.01)
        assert read_all(mnt, digests) == digests  # first reads: LOOKUP and READ each
        assert waiting.is_alive(), "the cached reads waited for the stalled one"
        waiting.join(60)
        assert late == {"late.bin": hashlib.sha256(b"l" * 25_000).hexdigest()}
    finally:
        proxy.stop()
