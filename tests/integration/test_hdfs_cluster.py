"""The real HDFS test cluster (tests/hdfs.py, scripts/hdfs-test-cluster.sh) through hdfs-native,
without cachefs: what later HDFS tests rely on. Writes and reads every byte of 200 small files and
a file of several blocks, lists them, and reads on through a paused or killed DataNode (3
DataNodes, replication 3) and across a NameNode restart."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.hdfs import CLIENT_CONFIG, HdfsCluster

pytestmark = pytest.mark.hdfs

ROOT = "/tree"
N_FILES = 200
SOCKET_TIMEOUT = int(CLIENT_CONFIG["dfs.client.socket-timeout"]) / 1000


@dataclass
class Tree:
    files: dict[str, bytes]  # absolute HDFS path -> content
    written_after_ms: int  # just before the upload started
    written_before_ms: int  # just after it ended


@pytest.fixture(scope="module")
def tree(hdfs_cluster: HdfsCluster) -> Tree:
    """200 files of 0-64 KiB (one empty) in nested directories under /tree."""
    rng = random.Random(15)
    files = {}
    for i in range(N_FILES):
        size = 0 if i == 0 else rng.randrange(1, 64 * 1024)
        files[f"{ROOT}/d{i % 7}/s{i % 3}/f{i:03d}.bin"] = rng.randbytes(size)
    before = time.time_ns() // 1_000_000
    hdfs_cluster.upload(files, threads=64)
    return Tree(files, before, time.time_ns() // 1_000_000)


def read_all(client, paths: list[str], threads: int = 16) -> tuple[dict[str, bytes], list[float]]:
    """Reads each path with `threads` readers; returns the contents and each read's seconds."""

    def read(path: str) -> tuple[bytes, float]:
        start = time.monotonic()
        with client.read(path) as f:
            data = f.read()
        return data, time.monotonic() - start

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(read, paths))
    return {p: r[0] for p, r in zip(paths, results, strict=True)}, [r[1] for r in results]


def test_every_byte_reads_back(hdfs_cluster: HdfsCluster, tree: Tree):
    got, _ = read_all(hdfs_cluster.client(), sorted(tree.files))
    bad = [p for p, data in tree.files.items() if got[p] != data]
    assert not bad, f"{len(bad)} files read back wrong, e.g. {bad[:3]}"


def test_a_file_of_many_blocks_reads_back_whole_and_in_ranges(hdfs_cluster: HdfsCluster):
    data = random.Random(7).randbytes(5 * 64 * 1024 + 123)  # 6 blocks of 64 KiB
    hdfs_cluster.upload({"/blocks/big.bin": data}, block_size=64 * 1024)
    client = hdfs_cluster.client()
    info = client.get_file_info("/blocks/big.bin")
    assert (info.length, info.blocksize) == (len(data), 64 * 1024)
    with client.read("/blocks/big.bin") as f:
        assert f.read() == data
        ranges = [(0, 1), (64 * 1024 - 10, 20), (100_000, 200_000), (len(data) - 5, 5)]
        for offset, length in ranges:
            assert f.read_range(offset, length) == data[offset : offset + length]


def test_listing_sizes_and_mtimes(hdfs_cluster: HdfsCluster, tree: Tree):
    client = hdfs_cluster.client()
    listed = list(client.list_status(ROOT, recursive=True))
    files = {s.path: s for s in listed if not s.isdir}
    dirs = {s.path for s in listed if s.isdir}

    assert set(files) == set(tree.files)
    assert dirs == {f"{ROOT}/d{i}" for i in range(7)} | {
        f"{ROOT}/d{i}/s{j}" for i in range(7) for j in range(3)
    }
    assert {p: s.length for p, s in files.items()} == {p: len(d) for p, d in tree.files.items()}
    assert {s.replication for s in files.values()} == {3}
    # The NameNode stamps mtimes (ms) on this machine's clock while the upload runs.
    early = {p for p, s in files.items() if s.modification_time < tree.written_after_ms - 1000}
    late = {p for p, s in files.items() if s.modification_time > tree.written_before_ms + 1000}
    assert not early and not late, (sorted(early)[:3], sorted(late)[:3])

    one = client.get_file_info(f"{ROOT}/d1/s1/f001.bin")
    assert (one.length, one.isdir) == (len(tree.files[f"{ROOT}/d1/s1/f001.bin"]), False)
    top = client.list_status(ROOT)
    assert sorted(s.path for s in top) == [f"{ROOT}/d{i}" for i in range(7)]


def test_a_paused_datanode_does_not_stop_reads(hdfs: HdfsCluster, tree: Tree):
    """SIGSTOP one of 3 DataNodes: a read that tries it first moves to another replica after the
    socket timeout; every byte still reads right."""
    paths = sorted(tree.files)[1:61]  # 60 non-empty files; 20 readers
    client = hdfs.client()  # new: no pooled connection to the DataNode
    hdfs.pause_datanode(2)
    start = time.monotonic()
    got, seconds = read_all(client, paths, threads=20)
    elapsed = time.monotonic() - start
    hdfs.resume_datanode(2)

    assert all(got[p] == tree.files[p] for p in paths)
    assert max(seconds) < 2 * SOCKET_TIMEOUT + 2, sorted(seconds)[-5:]
    # About a third of the reads try the paused DataNode first; (2/3)^60 that none does.
    waited = [s for s in seconds if s >= SOCKET_TIMEOUT * 0.8]
    assert waited, f"no read went to the paused DataNode first: {sorted(seconds)[-5:]}"
    assert elapsed < 4 * SOCKET_TIMEOUT + 5


def test_a_killed_datanode_does_not_stop_reads_and_comes_back(hdfs: HdfsCluster, tree: Tree):
    paths = sorted(tree.files)[61:121]
    hdfs.kill_datanode(3)
    got, seconds = read_all(hdfs.client(), paths, threads=20)
    assert all(got[p] == tree.files[p] for p in paths)
    assert max(seconds) < SOCKET_TIMEOUT, sorted(seconds)[-5:]  # refused: next replica at once

    hdfs.start_datanode(3)
    assert hdfs.pid("datanode3") is not None
    got, _ = read_all(hdfs.client(), paths, threads=20)
    assert all(got[p] == tree.files[p] for p in paths)


def test_namenode_stop_and_start(hdfs: HdfsCluster, tree: Tree):
    """With the NameNode down a call fails fast (bounded failover attempts); after a restart on
    the same port the same client works again and the data is all there."""
    client = hdfs.client()
    path = f"{ROOT}/d2/s2/f002.bin"
    assert client.get_file_info(path).length == len(tree.files[path])

    hdfs.stop_namenode()
    start = time.monotonic()
    with pytest.raises(OSError):
        client.get_file_info(path)
    assert time.monotonic() - start < 3

    hdfs.start_namenode()
    assert client.get_file_info(path).length == len(tree.files[path])
    paths = sorted(tree.files)[121:]
    got, _ = read_all(client, paths)
    assert all(got[p] == tree.files[p] for p in paths)
