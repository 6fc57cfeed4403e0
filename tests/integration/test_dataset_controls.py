"""Per-dataset controls (issue 17 item 3) with real master and worker processes: a pin survives
worker and master restarts and a flood of another dataset; a quota caps a dataset's cached
bytes while another dataset fills the rest (new workers take it at registration, and it is
split over the live workers); a TTL expires entries; the workers' watermarks are flags."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from tests.procs import (
    add_dataset,
    master_process,
    run_cli,
    running_cluster,
    stop_services,
    worker_process,
)

MiB = 1 << 20
SIZE = 100_000  # every file one size: one slab size class, so retention is the policy's alone


def write_files(root: Path, count: int, seed: int, size: int = SIZE) -> None:
    rng = random.Random(seed)
    for i in range(count):
        path = root / f"d{i // 50:02d}" / f"f{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def cli(master, *args):
    return run_cli(*args, "--master", master.address, timeout=300)


def ok(master, *args) -> str:
    result = cli(master, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def status(master) -> dict:
    return json.loads(ok(master, "status", "--json"))


def dataset(report: dict, name: str) -> dict:
    return next(d for d in report["datasets"] if d["name"] == name)


def held_by(worker: dict, name: str) -> int:
    return worker["stats"].get("datasets", {}).get(name, {}).get("bytes", 0)


def test_a_pin_survives_worker_and_master_restarts_and_a_flood(tmp_path):
    write_files(tmp_path / "keep", 20, seed=1)  # 2 MB
    write_files(tmp_path / "flood", 480, seed=2)  # 48 MB: three times the tier
    with running_cluster(tmp_path, workers=1, mem="16M") as (master, (worker,)):
        add_dataset(master, "keep", tmp_path / "keep")
        add_dataset(master, "flood", tmp_path / "flood")
        assert (
            ok(master, "dataset", "pin", "keep") == "dataset keep: pinned (applied on 1 worker)\n"
        )
        missing = cli(master, "dataset", "pin", "nosuch")
        assert missing.returncode == 1
        assert missing.stderr == "cachefs: error: unknown dataset 'nosuch'\n"
        ok(master, "load", "keep")

        worker.stop()
        worker.start()
        (shown,) = status(master)["workers"]
        assert shown["stats"]["controls"]["datasets"]["keep"]["pinned"] is True
        master.stop()
        master.start()
        listing = ok(master, "dataset", "ls").splitlines()
        assert [line.split("\t")[-1] for line in listing if line.startswith("keep\t")] == ["pinned"]
        assert dataset(status(master), "keep")["controls"]["pinned"] is True
        # A worker restarted while the master is down keeps the pin it was last told.
        worker.args += ["--secret-file", str(tmp_path / "master-state" / "secret")]
        master.stop()  # (its secret is published only while it runs)
        worker.stop()
        worker.start()
        master.start()

        flooded = cli(master, "load", "flood")
        assert flooded.returncode in (0, 3), flooded.stdout + flooded.stderr
        assert "20/20 files cached (100.0%)" in ok(master, "load", "keep", "--check")
        report = status(master)
        assert dataset(report, "flood")["stored_bytes"] >= 4 * MiB  # the flood took the rest

        unpinned = ok(master, "dataset", "unpin", "keep")
        assert unpinned == "dataset keep: no pin, quota or ttl (applied on 1 worker)\n"
        (shown,) = status(master)["workers"]
        assert shown["stats"]["controls"]["datasets"] == {}


def test_a_quota_caps_a_dataset_while_another_fills_the_rest(tmp_path):
    write_files(tmp_path / "capped", 120, seed=3)  # 12 MB: would fit the 16 MiB tier
    write_files(tmp_path / "other", 400, seed=4)  # 40 MB
    master = master_process(tmp_path)
    workers = []
    try:
        master.start()
        add_dataset(master, "capped", tmp_path / "capped")
        add_dataset(master, "other", tmp_path / "other")
        assert ok(master, "dataset", "set", "capped", "--quota", "4M") == (
            "dataset capped: quota 4.0 MiB (no live workers; each applies it when it registers)\n"
        )
        workers.append(worker_process(tmp_path, master.address, "w1", "16M"))
        workers[0].start()  # a worker that registers later gets the quota too

        loaded = cli(master, "load", "capped")
        assert loaded.returncode == 3, loaded.stdout + loaded.stderr  # fetched, not all kept
        assert "the dataset is larger than its quota (4.0 MiB)" in loaded.stdout
        capped = dataset(status(master), "capped")
        assert capped["controls"]["quota_bytes"] == 4 * MiB
        assert 3 * MiB <= capped["stored_bytes"] <= 4 * MiB

        flooded = cli(master, "load", "other")
        assert flooded.returncode in (0, 3), flooded.stdout + flooded.stderr
        report = status(master)
        assert dataset(report, "capped")["stored_bytes"] <= 4 * MiB
        assert dataset(report, "other")["stored_bytes"] >= 6 * MiB

        # Lowered: trimmed at once. A second worker: each keeps at most half of it.
        assert ok(master, "dataset", "set", "capped", "--quota", "2M") == (
            "dataset capped: quota 2.0 MiB (applied on 1 worker)\n"
        )
        assert dataset(status(master), "capped")["stored_bytes"] <= 2 * MiB
        workers.append(worker_process(tmp_path, master.address, "w2", "16M"))
        workers[1].start()
        deadline = time.monotonic() + 20
        while True:  # the share follows membership with the next heartbeat replies
            shown = status(master)["workers"]
            shares = [w["stats"]["controls"]["datasets"]["capped"]["quota_bytes"] for w in shown]
            if shares == [MiB, MiB] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert shares == [MiB, MiB]
        assert all(held_by(w, "capped") <= MiB for w in shown)
        loaded = cli(master, "load", "capped")
        assert loaded.returncode == 3 and "larger than its quota (2.0 MiB)" in loaded.stdout
        report = status(master)
        assert all(held_by(w, "capped") <= MiB for w in report["workers"])
        assert dataset(report, "capped")["stored_bytes"] <= 2 * MiB

        assert "quota 2.0 MiB" in ok(master, "dataset", "ls")
        assert ok(master, "dataset", "set", "capped", "--quota", "none").startswith(
            "dataset capped: no pin, quota or ttl (applied on 2 workers)"
        )
    finally:
        stop_services(*workers, master)


def test_a_ttl_expires_entries(tmp_path):
    write_files(tmp_path / "short", 20, seed=5, size=50_000)
    with running_cluster(tmp_path, workers=1, mem="16M") as (master, (worker,)):
        add_dataset(master, "short", tmp_path / "short")
        assert ok(master, "dataset", "set", "short", "--ttl", "2s") == (
            "dataset short: ttl 2s (applied on 1 worker)\n"
        )
        loaded = cli(master, "load", "short")
        assert loaded.returncode in (0, 3), loaded.stdout + loaded.stderr  # 3: outlived 2 s
        # Nothing reads the entries: the worker's sweep drops them (it logs what it drops).
        deadline = time.monotonic() + 20
        while "entries expired" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert re.search(r"dataset short: \d+ entries expired \(ttl 2s\)", worker.log())
        check = ok(master, "load", "short", "--check")
        assert check.startswith("short: 0/20 files cached"), check
        assert dataset(status(master), "short")["stored_bytes"] == 0
        assert "ttl 2s" in ok(master, "status")

        ok(master, "dataset", "set", "short", "--ttl", "none")
        ok(master, "load", "short")  # fetched again
        time.sleep(2.5)  # older than the TTL was
        assert "20/20 files cached (100.0%)" in ok(master, "load", "short", "--check")


def test_bad_control_input_gets_one_line(tmp_path):
    for args, message in (
        (("--quota", "lots"), "--quota: invalid size 'lots'"),
        (("--quota", "0"), "--quota must be a positive size, or none"),
        (("--ttl", "soon"), "--ttl: invalid duration 'soon'"),
        (("--ttl", "-5m"), "--ttl must be a positive duration, or none"),
        ((), "nothing to set: give --quota SIZE|none and/or --ttl DURATION|none"),
    ):
        result = run_cli("dataset", "set", "frames", *args, "--master", "127.0.0.1:9")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"cachefs: error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1


def test_worker_watermarks_are_flags_checked_at_start(tmp_path):
    state = str(tmp_path / "never")
    for high, low in (("0.5", "0.8"), ("1.5", "0.8"), ("0.9", "0"), ("nan", "0.5")):
        result = run_cli(
            "worker", "--state", state, "--insecure", "--high-watermark", high,
            "--low-watermark", low,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            "cachefs: error: watermarks need 0 < --low-watermark <= --high-watermark <= 1"
        )
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "never").exists()  # refused before anything was created

    write_files(tmp_path / "big", 240, seed=6)  # 24 MB
    master = master_process(tmp_path)
    worker = None
    try:
        master.start()
        worker = worker_process(
            tmp_path, master.address, "w1", "16M", "--high-watermark", "0.5",
            "--low-watermark", "0.4",
        )  # fmt: skip
        worker.start()
        add_dataset(master, "big", tmp_path / "big")
        loaded = cli(master, "load", "big")
        assert loaded.returncode == 3, loaded.stdout + loaded.stderr
        (shown,) = status(master)["workers"]
        mem = shown["stats"]["tiers"]["mem"]
        assert 0.3 * mem["capacity"] <= mem["used"] <= 0.5 * mem["capacity"]
    finally:
        stop_services(worker, master)
