"""Multi-host faults under training-like readers: every test runs a fresh cluster (master,
workers and FUSE clients on their own network namespaces, the store behind an S3 proxy), reads
with 8 threads per client that verify every byte, breaks something mid-epoch and checks that
no reader saw an error or a wrong byte.

Timings that matter (cachefs/workers.py, master/registry.py): a client's call to a worker gives
up after 20 s and the worker is then ranked last for 5 s; the master drops a worker after
--liveness s without heartbeats (5 here, 10 by default; heartbeats every liveness/4 s); mounts
refresh the worker list every 2 s. Waits are for events or polled states, with deadlines.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import lmdb
import msgpack
import pytest

from tests.cluster.conftest import WORKERS, Cluster, Frames, upload_frames
from tests.cluster.readers import Readers
from tests.fuse.conftest import make_files
from tests.procs import cachefs_cmd

ALL = set(WORKERS)
XATTR_OWNER = "user.cachefs.owner"


def start(
    cluster, frames: Frames, *clients: str, mount_args=(), **kwargs
) -> tuple[Cluster, list[Path]]:
    """A started cluster with dataset "ds" registered and mounted on `clients` (default c1)."""
    c = cluster(**kwargs)
    c.add_dataset("ds", frames)
    return c, [c.mount(client, "ds", *mount_args) for client in clients or ("c1",)]


def readers(mnt: Path, frames: Frames, seed: int = 0) -> Readers:
    return Readers(mnt, frames.digests, threads=8, seed=seed, expected=frames.data)


def served(stats: dict) -> int:
    """Reads a worker answered (from its cache or after a fill)."""
    return stats["hits"] + stats["misses"]


def owners(mnt: Path, rels) -> dict[str, str]:
    """rel -> the worker id the client ranks first for it (the user.cachefs.owner xattr)."""
    return {rel: os.getxattr(mnt / rel, XATTR_OWNER).decode() for rel in rels}


def worker_ids(c: Cluster) -> dict[str, str]:
    """host -> worker id."""
    return {host: stats["worker_id"] for host, stats in c.worker_stats().items()}


def test_killed_worker_mid_epoch(cluster, frames):
    """SIGKILL a worker while two clients read: their epochs complete, every byte right (the
    killed worker's files come from the next-ranked worker)."""
    c, (mnt1, mnt2) = start(cluster, frames, "c1", "c2")
    r1, r2 = readers(mnt1, frames).start(), readers(mnt2, frames, seed=1).start()
    r1.wait_files(100)
    at_kill = r1.files
    c.workers["w1"].kill()
    assert at_kill < len(frames.digests)  # the kill landed in the first epoch
    r1.wait_epochs(2, timeout=90)  # the epoch it hit, and one after
    r2.wait_epochs(2, timeout=90)
    for report in (r1.finish(), r2.finish()):
        print(report.summary())
        report.assert_clean()
    c.wait_workers(ALL - {"w1"})  # and the master noticed


def test_status_answers_while_a_worker_is_down(cluster, frames):
    """docs/architecture.md: `cachefs status` asks every live worker for its stats, "falling
    back to the last heartbeat for a worker that does not answer". Right after a worker dies
    (liveness 30 s: the master still lists it) and while another one hangs, status must still
    answer, in seconds. (It failed with "cannot reach worker ..." when status began to ask each
    file's owner for its cached share.)"""
    c = cluster(liveness=30.0)
    c.add_dataset("ds", frames)
    assert "0 failed" in c.cli("load", "ds").stdout
    c.workers["w1"].kill()
    c.workers["w2"].pause()
    started = time.monotonic()
    result = c.cli("status", "--json", check=False)
    took = time.monotonic() - started
    assert result.returncode == 0, f"status with w1 dead, w2 hung: {result.stderr.strip()}"
    report = json.loads(result.stdout)
    assert {w["host"] for w in report["workers"]} == ALL  # both still listed
    (ds,) = report["datasets"]
    assert ds["name"] == "ds" and 0 < ds["cached_percent"] < 100  # w3's share only
    assert took < 20, f"status took {took:.1f}s with a hung worker"


def test_paused_worker_costs_a_deadline_not_errors(cluster, frames):
    """SIGSTOP a worker: reads of its files wait out the 20 s worker-call deadline, then fall
    back; 0 errors, and it serves again after SIGCONT."""
    c, (mnt,) = start(cluster, frames)
    r = readers(mnt, frames).start()
    r.wait_files(100)
    c.workers["w1"].pause()
    r.wait_more(2 * len(frames.digests), timeout=120)  # two epochs' worth with w1 stopped
    during = r.report()
    c.wait_workers(ALL - {"w1"})  # the master dropped it
    c.workers["w1"].resume()
    c.wait_workers(ALL)  # it registers again
    before = served(c.worker_stats()["w1"])
    c.wait_until("w1 serving again", lambda: served(c.worker_stats()["w1"]) > before)
    report = r.finish()
    print(f"while paused: {during.summary()}\nwhole run: {report.summary()}")
    report.assert_clean()
    assert during.max >= 15, "no read waited for the paused worker: the fault missed"
    assert report.max < 45, "a read took longer than the worker deadline plus a fallback"


def test_master_restart_mid_epoch(cluster, frames):
    """SIGKILL the master mid-epoch: mounts keep serving (metadata is cached, workers are up),
    then reconnect; the restarted master has the dataset unchanged. (Kernel entries may be
    evicted meanwhile, e.g. by memory pressure or a benchmark's drop_caches on the machine:
    the mount then answers the lookups from its own cache.)"""
    c, (mnt,) = start(cluster, frames)
    readers(mnt, frames).run_epochs(1).assert_clean()  # every name looked up once
    r = readers(mnt, frames, seed=1).start()
    r.wait_files(100)
    c.master.kill()
    r.wait_more(len(frames.digests))  # a full epoch's worth of reads without a master
    with pytest.raises(OSError) as down:  # a name never looked up needs the master
        os.stat(mnt / f"missing-{uuid.uuid4().hex}")
    assert down.value.errno != errno.ENOENT, "the mount answered a lookup without its master"
    c.master.start()
    c.wait_workers(ALL)  # workers registered again
    r.wait_more(len(frames.digests))
    report = r.finish()
    print(report.summary())
    report.assert_clean()

    info = c.status()["datasets"]
    assert [(d["name"], d["files"]) for d in info] == [("ds", len(frames.digests))]
    synced = c.cli("dataset", "sync", "ds")
    assert "added 0, changed 0, removed 0" in synced.stdout  # inodes and versions kept
    with pytest.raises(FileNotFoundError):  # the mount reconnected: the master answers again
        os.stat(mnt / f"missing-{uuid.uuid4().hex}")
    assert os.statvfs(mnt).f_files >= len(frames.digests)
    fresh = c.mount("c2", "ds")
    readers(fresh, frames, seed=2).run_epochs(1).assert_clean()


def test_mount_answers_cached_lookups_while_the_master_is_down(cluster, frames):
    """docs/architecture.md: lookups "go to the master once and are cached in the client (the
    kernel caches them too, for --attr-timeout)". With a 1 s --attr-timeout the kernel asks the
    client again; the client must answer from its cache while the master is down."""
    c = cluster()
    c.add_dataset("ds", frames)
    mnt = c.mount("c1", "ds", "--attr-timeout", "1")
    warm = readers(mnt, frames).run_epochs(1)  # every name looked up once
    if warm.errors or warm.wrong_files:
        pytest.fail(warm.summary())
    c.master.kill()
    time.sleep(1.5)  # the kernel's entries expire (a TTL, not a readiness wait)
    report = readers(mnt, frames, seed=1).run_epochs(1)
    c.master.start()
    if report.wrong_files:
        pytest.fail(report.summary())
    assert not report.errors, f"without the master: {report.summary()}; {report.errors[:3]}"


def test_restarted_master_keeps_reads_in_the_cache(cluster, frames):
    """A master restart must not send a warm cluster's reads to the store. Workers' heartbeats
    are blocked while the master restarts, so only the membership it persisted can tell the
    mounts where the data is (before that fix, a restarted master listed no workers until each
    heartbeated again, and mounts read from the store meanwhile). Liveness 10 s: the restored
    workers must not expire while their heartbeats are blocked (about 5 s here)."""
    c, (mnt,) = start(cluster, frames, liveness=10.0)
    if "0 failed" not in c.cli("load", "ds").stdout:
        pytest.fail("load failed")
    master_ip = c.net["master"].ip
    probe = mnt / frames.nonempty[0]
    try:
        for name in WORKERS:  # heartbeats cannot reach the master for these few seconds
            c.net[name].block(master_ip)
        c.master.kill()
        c.master.start()
        c.wait_until(
            "the new master to answer",
            lambda: c.cli("dataset", "ls", check=False).returncode == 0,
            30,
        )
        # Over a refresh period of the mount's worker list (2 s), it must never lose them.
        seen = set()
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            seen.add(os.getxattr(probe, XATTR_OWNER).decode())
            time.sleep(0.1)  # sampling the mount's view over a period, not a readiness wait
        assert "" not in seen, "the mount lost its workers after the master restart"
        gets = c.store.counts()["gets"]
        report = readers(mnt, frames, seed=1).run_epochs(1)
        bypassed = c.store.counts()["gets"] - gets
    finally:
        for name in WORKERS:
            c.net[name].unblock(master_ip)
    if report.errors or report.wrong_files:
        pytest.fail(report.summary())
    c.wait_workers(ALL)
    assert bypassed == 0, (
        f"{bypassed} of {len(frames.nonempty)} reads of a fully cached dataset went to the "
        f"remote store after a master restart ({report.summary()})"
    )


def test_worker_rejoins_with_its_disk_cache(cluster, frames, tmp_path):
    """A worker with a DISK tier is killed, dropped, restarted: it keeps its entries and serves
    them; the epoch after it rejoins makes no request to the store."""
    disk = ["--mem", "0", "--disk", str(tmp_path / "w1-disk"), "--disk-size", "256M"]
    # One serving process: each process refreshes its worker list on its own clock, and the
    # owner xattr below speaks for the process that answers it.
    c, (mnt,) = start(cluster, frames, mount_args=["--procs", "1"], worker_args={"w1": disk})
    loaded = c.cli("load", "ds")
    assert f"{len(frames.digests)}/{len(frames.digests)} files" in loaded.stdout, loaded.stdout
    assert len(c.store.gets()) == len(frames.nonempty)  # each file with data fetched,
    assert c.store.counts()["gets"] <= 1.05 * len(frames.nonempty)  # once, or hedged
    ids = worker_ids(c)
    # The mount's worker list is refreshed every 2 s: it may not have all three yet.
    c.wait_until(
        "c1 to rank over all workers",
        lambda: set(owners(mnt, frames.nonempty).values()) == set(ids.values()),
    )
    on_w1 = sorted(rel for rel, w in owners(mnt, frames.nonempty).items() if w == ids["w1"])
    entries = c.worker_stats()["w1"]["tiers"]["disk"]["entries"]
    assert entries == len(on_w1) > 0

    c.workers["w1"].kill()
    readers(mnt, frames).run_epochs(1).assert_clean()  # w1's files from the others meanwhile
    c.wait_workers(ALL - {"w1"})
    c.workers["w1"].start()
    stats = c.wait_workers(ALL)["w1"]
    assert stats["worker_id"] == ids["w1"]  # the same worker, with its disk entries
    assert stats["tiers"]["disk"]["entries"] == entries
    c.wait_until(  # the client ranks it first again for its files
        "c1 to use w1 again", lambda: owners(mnt, on_w1[:1])[on_w1[0]] == ids["w1"]
    )
    gets = c.store.gets()
    readers(mnt, frames, seed=1).run_epochs(1).assert_clean()
    assert c.store.gets() - gets == Counter(), "the rejoined epoch went to the store"
    stats = c.worker_stats()["w1"]
    assert stats["hits"] >= len(on_w1) and stats["misses"] == 0 and stats["remote_reads"] == 0


def test_flaky_store(cluster, frames, tmp_path):
    """The store fails 20% of requests (503 SlowDown) and stalls 5% for 2 s: `cachefs load`
    of half the files and an epoch over all (the other half filled on demand) both complete."""
    c, (mnt,) = start(cluster, frames)
    c.store.set(fail_rate=0.2, stall_rate=0.05, stall_seconds=2.0)
    half = frames.nonempty[::2]
    listing = tmp_path / "half.txt"
    listing.write_text("\n".join(half) + "\n")
    loaded = c.cli("load", "ds", "--files", str(listing), timeout=300)
    assert f"{len(half)}/{len(half)} files" in loaded.stdout and "0 failed" in loaded.stdout
    failed_during_load = c.store.counts()["failed"]
    report = readers(mnt, frames).run_epochs(1, timeout=300)
    counts = c.store.counts()
    print(f"{report.summary()}; injected {counts['failed']} failures, "
          f"stalled {counts['stalled']} requests")  # fmt: skip
    report.assert_clean()
    assert failed_during_load > 0 and counts["failed"] > failed_during_load
    assert counts["stalled"] > 0


def index_slots(state: Path) -> list[tuple[bytes, int, int, int]]:
    """(key, offset in disk.slab, length, run size) of each DISK entry of a worker's index
    (layout in worker/index.py), read with lmdb read-only while the worker runs."""
    env = lmdb.open(str(state / "index.lmdb"), readonly=True, max_dbs=4)
    try:
        entries = env.open_db(b"entries", create=False)
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            layout, _capacity, page = msgpack.unpackb(txn.get(b"geometry:disk", db=meta))
            assert layout == "extents"
            out = []
            for key, raw in txn.cursor(entries):
                tier, start, pages, length, _digest, _ds = msgpack.unpackb(raw)
                if tier == "disk":
                    out.append((bytes(key), start * page, length, pages * page))
        return sorted(out)
    finally:
        env.close()


def test_corrupt_truncated_and_swapped_slots_are_refetched(cluster, frames, tmp_path):
    """Bit flips, torn (zeroed) tails and swapped slots in a worker's disk.slab are caught by the
    checksums (stats "corrupt"), dropped and refetched once each; a disk.slab truncated while
    the worker was down makes it forget the tier. Readers never see a wrong byte."""
    disk_dir = tmp_path / "w1-disk"
    disk = ["--mem", "0", "--disk", str(disk_dir), "--disk-size", "64M"]
    c, (mnt,) = start(cluster, frames, worker_args={"w1": disk})
    assert "0 failed" in c.cli("load", "ds").stdout
    slots = [s for s in index_slots(c.tmp / "w1" / "state") if s[2] >= 64]
    flipped, torn = slots[0:3], slots[3:6]
    by_size: dict[int, list] = {}
    for s in slots[6:]:
        by_size.setdefault(s[3], []).append(s)
    pairs = [group[:2] for group in by_size.values() if len(group) >= 2][:2]
    assert len(pairs) == 2, "not enough slots of one size class to swap"
    damaged = len(flipped) + len(torn) + 2 * len(pairs)

    fd = os.open(disk_dir / "disk.slab", os.O_RDWR)
    try:
        for _key, offset, length, _size in flipped:
            for at in (offset, offset + length // 2, offset + length - 1):
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
        for _key, offset, length, _size in torn:
            os.pwrite(fd, bytes(length - length // 2), offset + length // 2)
        for (_ka, a, _la, size), (_kb, b, _lb, _) in pairs:
            data_a, data_b = os.pread(fd, size, a), os.pread(fd, size, b)
            os.pwrite(fd, data_b, a)
            os.pwrite(fd, data_a, b)
    finally:
        os.close(fd)

    before = c.store.gets()
    assert c.worker_stats()["w1"]["corrupt"] == 0
    readers(mnt, frames).run_epochs(1).assert_clean()
    assert c.worker_stats()["w1"]["corrupt"] == damaged
    refetched = c.store.gets() - before
    assert len(refetched) == damaged  # each damaged entry refetched (once, or hedged)
    readers(mnt, frames, seed=1).run_epochs(1).assert_clean()  # the refetched copies are good
    assert c.worker_stats()["w1"]["corrupt"] == damaged
    assert c.store.gets() - before == refetched

    entries = c.worker_stats()["w1"]["tiers"]["disk"]["entries"]
    c.workers["w1"].kill()
    slab = disk_dir / "disk.slab"
    os.truncate(slab, slab.stat().st_size // 2)
    c.workers["w1"].start()
    assert c.wait_workers(ALL)["w1"]["tiers"]["disk"]["entries"] == 0  # the tier was forgotten
    gets = c.store.counts()["gets"]
    readers(mnt, frames, seed=2).run_epochs(1).assert_clean()
    assert c.store.counts()["gets"] - gets == entries  # w1's files fetched again, once each


def test_worker_disk_full(tmpfs, cluster, frames, tmp_path, moto_server):
    """A DISK tier larger than its free space stops the worker at start with one clear line; a
    fitting tier on a disk then filled to the brim serves a dataset bigger than the cache with
    no ENOSPC (the tier is preallocated)."""
    small = tmpfs("32M")
    fitting = ["--mem", "0", "--disk", str(small), "--disk-size", "8M"]
    c = cluster(workers=("w1",), worker_args={"w1": fitting})

    other = tmpfs("32M")
    host = c.net.add_host("w9")
    too_big = host.run(
        cachefs_cmd("worker", "--master", c.master_address, "--listen", f"{host.ip}:0",
                    "--state", str(tmp_path / "w9-state"), "--mem", "0",
                    "--disk", str(other), "--disk-size", "64M"),
        timeout=60,
    )  # fmt: skip
    assert too_big.returncode == 1, too_big.stderr
    assert too_big.stderr.strip().splitlines() == [
        f"cachefs: error: no room for a 64 MiB disk tier at {other / 'disk.slab'}"
    ]
    assert os.listdir(other) == []  # nothing half-made left behind

    filler = small / "filler"
    with open(filler, "wb") as f:  # fill the disk to the brim around the preallocated tier
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    source = tmp_path / "big"
    big = upload_frames(moto_server, source, make_files(source, 200, max_size=128_000, seed=22))
    total = sum((source / rel).stat().st_size for rel in big.digests)
    assert total > 8 << 20  # bigger than the cache
    c.add_dataset("big", big)
    mnt = c.mount("c1", "big")
    report = readers(mnt, big).run_epochs(2)
    print(report.summary())
    report.assert_clean()
    stats = c.worker_stats()["w1"]
    assert stats["evictions"] > 0 and stats["remote_reads"] > len(big.nonempty)
    assert os.statvfs(small).f_bavail == 0  # the disk stayed full all along


def test_cut_worker_link_falls_back_and_recovers(cluster, frames):
    """Unplug a worker's host mid-epoch: clients wait out the deadline, fall back, and use it
    again once the link is back and it re-registers."""
    c, (mnt,) = start(cluster, frames)
    r = readers(mnt, frames).start()
    r.wait_files(100)
    c.net["w1"].cut()
    r.wait_more(2 * len(frames.digests), timeout=120)
    during = r.report()
    c.wait_workers(ALL - {"w1"})
    c.net["w1"].heal()
    c.wait_workers(ALL, timeout=90)
    before = served(c.worker_stats()["w1"])
    c.wait_until("w1 serving again", lambda: served(c.worker_stats()["w1"]) > before)
    report = r.finish()
    print(f"while cut: {during.summary()}\nwhole run: {report.summary()}")
    report.assert_clean()
    assert report.max < 45


def test_scale_out_and_in_during_epochs(cluster, frames):
    """A 4th worker joins and later one leaves (SIGTERM) while two clients read: 0 errors, and
    the new worker takes its share of reads."""
    c, (mnt1, mnt2) = start(cluster, frames, "c1", "c2")
    r1, r2 = readers(mnt1, frames).start(), readers(mnt2, frames, seed=1).start()
    r1.wait_files(100)
    c.add_worker("w4")
    c.wait_workers(ALL | {"w4"})
    c.wait_until("w4 serving", lambda: served(c.worker_stats()["w4"]) > 0)
    r1.wait_more(len(frames.digests))
    c.workers["w2"].stop()  # SIGTERM: scale in
    r1.wait_more(len(frames.digests))
    c.wait_workers({"w1", "w3", "w4"})
    r1.wait_more(len(frames.digests))
    for report in (r1.finish(), r2.finish()):
        print(report.summary())
        report.assert_clean()
