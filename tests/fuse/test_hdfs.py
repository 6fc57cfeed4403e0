"""cachefs on a real HDFS (tests/hdfs.py: a NameNode and 3 DataNodes, replication 3) with real
processes: a master and 2 workers, cluster mounts, `cachefs load`, incremental sync, and a
NameNode that stops answering."""

from __future__ import annotations

import errno
import hashlib
import time

import pytest

from tests.fuse.conftest import read_all
from tests.fuse.test_load_and_sync import cli
from tests.hdfs import HdfsCluster

pytestmark = pytest.mark.hdfs


def upload_clips(hdfs: HdfsCluster, root: str, count: int, seed: int) -> dict[str, str]:
    """`count` files in directories of 10 below `root`; returns rel -> sha256."""
    import random

    rng = random.Random(seed)
    files = {f"c{i // 50}/v{i // 10:04d}/f{i % 10}.jpg": rng.randbytes(rng.randrange(1, 30_000))
             for i in range(count)}  # fmt: skip
    hdfs.upload({f"{root}/{rel}": data for rel, data in files.items()}, threads=64)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def loaded_but_one(cluster, mounts, hdfs, name: str, *, seed: int, op_timeout: int):
    """Dataset `name`: 40 files on HDFS, all loaded but the last; a cluster mount with that
    op deadline that knows every name. Returns (mountpoint, rel -> sha256, the uncached rel)."""
    master, _ = cluster
    root = f"/cachefs-{name}"
    digests = upload_clips(hdfs, root, 40, seed=seed)
    assert cli(master, "dataset", "add", name, hdfs.uri + root).returncode == 0
    uncached = sorted(digests)[-1]
    assert cli(master, "load", name, *sorted(digests)[:-1]).returncode == 0
    mnt = mounts.mount(name, "--master", master.address, "--prefetch", "0",
                       "--op-timeout", str(op_timeout))  # fmt: skip
    (mnt / uncached).stat()  # known to the mount: only its data is missing
    return mnt, digests, uncached


def test_hdfs_dataset_loads_serves_and_syncs(cluster, mounts, hdfs_cluster):
    master, _ = cluster
    root = "/cachefs-load"
    digests = upload_clips(hdfs_cluster, root, 150, seed=31)
    added = cli(master, "dataset", "add", "h", hdfs_cluster.uri + root)
    assert added.returncode == 0, added.stderr
    loaded = cli(master, "load", "h")
    assert loaded.returncode == 0, loaded.stderr
    assert "150/150 files" in loaded.stdout and "0 failed" in loaded.stdout
    mnt = mounts.mount("h", "--master", master.address)
    assert read_all(mnt, digests) == digests
    inode = (mnt / "c0/v0000/f1.jpg").stat().st_ino

    client = hdfs_cluster.shared_client
    changed, removed = "c0/v0000/f2.jpg", "c0/v0000/f3.jpg"
    hdfs_cluster.upload({f"{root}/new/f.jpg": b"new", f"{root}/{changed}": b"changed"})
    client.delete(f"{root}/{removed}")
    synced = cli(master, "dataset", "sync", "h")
    assert "added 1, changed 1, removed 1" in synced.stdout, synced.stdout
    deadline = time.monotonic() + 30
    while (mnt / removed).exists():  # the mount applies the re-sync within its poll interval
        assert time.monotonic() < deadline, "the mount never saw the re-sync"
        time.sleep(0.2)  # polling the mount's view, as a reader would
    assert (mnt / "new/f.jpg").read_bytes() == b"new"
    assert (mnt / changed).read_bytes() == b"changed"
    assert (mnt / "c0/v0000/f1.jpg").stat().st_ino == inode  # unchanged files keep their inode


def test_a_name_service_uri_through_the_cli(cluster, mounts, hdfs_cluster):
    """hdfs://NS/path with HA NameNodes given as -o options (nn1 dead, nn2 live): the master
    lists through NS, the workers load and fill misses through it (the options travel with
    the dataset)."""
    master, _ = cluster
    root = "/cachefs-ns"
    digests = upload_clips(hdfs_cluster, root, 40, seed=35)
    options = [f"-o{k}={v}" for k, v in hdfs_cluster.nameservice_config("cachefsNS").items()]
    added = cli(master, "dataset", "add", "ns", f"hdfs://cachefsNS{root}", *options)
    assert added.returncode == 0, added.stderr
    assert "40 files" in added.stdout, added.stdout
    listed = cli(master, "dataset", "ls")
    assert f"ns\thdfs://cachefsNS{root}\t40 files" in listed.stdout, listed.stdout
    half = sorted(digests)[::2]
    loaded = cli(master, "load", "ns", *half)
    assert loaded.returncode == 0 and "20/20 files" in loaded.stdout, loaded.stdout + loaded.stderr
    mnt = mounts.mount("ns", "--master", master.address)
    assert read_all(mnt, digests) == digests  # the other half: cold reads through the workers


def test_a_silent_namenode_costs_the_mount_a_deadline_not_a_hang(cluster, mounts, hdfs):
    mnt, digests, uncached = loaded_but_one(cluster, mounts, hdfs, "n", seed=32, op_timeout=8)
    with hdfs.paused("namenode"):
        cached = sorted(digests)[:-1]
        assert read_all(mnt, cached) == {rel: digests[rel] for rel in cached}
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            (mnt / uncached).read_bytes()
        assert info.value.errno in (errno.EIO, errno.ETIMEDOUT), info.value
        assert time.monotonic() - started < 30  # the op deadline, not the NameNode's return
    assert (mnt / uncached).read_bytes() and read_all(mnt, digests) == digests


def test_datanodes_paused_and_killed_during_an_epoch_cost_no_reader_errors(
    cluster, mounts, hdfs
):
    master, _ = cluster
    root = "/cachefs-dn"
    digests = upload_clips(hdfs, root, 120, seed=33)
    # Every block has 3 copies: a read that meets the paused DataNode moves on after the
    # client's socket timeout (a dataset option here: 3 s; 10 s by default), one that meets
    # the killed one at once.
    timeout = "-odfs.client.socket-timeout=3000"
    assert cli(master, "dataset", "add", "d", hdfs.uri + root, timeout).returncode == 0
    mnt = mounts.mount("d", "--master", master.address, "--prefetch", "0")
    order = sorted(digests)
    first = read_all(mnt, order[:40])  # cold reads: every one goes to HDFS
    hdfs.pause_datanode(1)
    hdfs.kill_datanode(2)
    rest = read_all(mnt, order[40:])
    assert {**first, **rest} == digests  # every byte, no reader error


def test_a_stopped_namenode_after_load_leaves_the_cache_readable(cluster, mounts, hdfs):
    mnt, digests, uncached = loaded_but_one(cluster, mounts, hdfs, "s", seed=34, op_timeout=10)
    hdfs.stop_namenode(kill=True)
    cached = sorted(digests)[:-1]
    assert read_all(mnt, cached) == {rel: digests[rel] for rel in cached}
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        (mnt / uncached).read_bytes()
    assert info.value.errno in (errno.EIO, errno.EHOSTUNREACH, errno.ETIMEDOUT), info.value
    # Refused connections are retried (the NameNode may be restarting), within the op deadline.
    assert time.monotonic() - started < 30
