"""RemoteStore on a real HDFS (tests/hdfs.py: a NameNode and 3 DataNodes) through hdfs-native:
listing, every byte, version checks, errors, the options that reach the client, and name
services (HA NameNodes: a dead first NameNode, from options or HADOOP_CONF_DIR)."""

from __future__ import annotations

import random
import time

import pytest

from cachefs import errors
from cachefs.ufs import RemoteStore, parse_uri
from tests.conftest import _free_port
from tests.hdfs import HdfsCluster

pytestmark = pytest.mark.hdfs

ROOT = "/ufs-test"


@pytest.fixture(scope="module")
def tree(hdfs_cluster: HdfsCluster) -> dict[str, bytes]:
    """rel -> bytes below ROOT: nested clips, an empty file, a file of several 1 MiB blocks."""
    rng = random.Random(3)
    files = {f"c{i % 3}/v{i % 5}/f{i:03d}.jpg": rng.randbytes(rng.randrange(1, 40_000))
             for i in range(60)}  # fmt: skip
    files["empty.bin"] = b""
    files["big/blocks.bin"] = rng.randbytes(3 * (1 << 20) + 123)
    hdfs_cluster.upload({f"{ROOT}/{rel}": data for rel, data in files.items()},
                        block_size=1 << 20)  # fmt: skip
    return files


async def listing(store: RemoteStore) -> dict:
    found = {}
    async for batch in store.iter_tree(batch_size=7):
        for entry in batch:
            assert entry.path not in found
            found[entry.path] = entry
    return found


async def test_listing_and_every_byte(hdfs_cluster, tree):
    store = RemoteStore(hdfs_cluster.uri + ROOT)
    await store.check()
    found = await listing(store)
    dirs = {"/".join(rel.split("/")[:i]) for rel in tree for i in range(1, rel.count("/") + 1)}
    assert {p for p, e in found.items() if e.is_dir} == dirs
    assert {p: e.size for p, e in found.items() if not e.is_dir} == {
        rel: len(data) for rel, data in tree.items()
    }
    client = hdfs_cluster.shared_client
    for rel, data in tree.items():
        entry = found[rel]
        status = client.get_file_info(f"{ROOT}/{rel}")
        assert entry.mtime_ns == status.modification_time * 1_000_000
        got = await store.read_version(rel, 0, len(data) + 10, entry.size, entry.mtime_ns)
        assert got == data
    big = tree["big/blocks.bin"]
    middle = (1 << 20) - 50  # across a block boundary
    assert await store.read_range("big/blocks.bin", middle, 100) == big[middle : middle + 100]
    assert await store.read_range("big/blocks.bin", len(big), 10) == b""


async def test_a_changed_file_is_refused_and_missing_ones_are_not_found(hdfs_cluster, tree):
    store = RemoteStore(hdfs_cluster.uri + ROOT)
    rel = "c0/v0/f000.jpg"
    entry = await store.stat(rel)
    hdfs_cluster.upload({f"{ROOT}/{rel}": b"replaced" * 10})
    try:
        with pytest.raises(errors.StaleVersion, match="changed in the remote store"):
            await store.read_version(rel, 0, entry.size, entry.size, entry.mtime_ns)
    finally:
        hdfs_cluster.upload({f"{ROOT}/{rel}": tree[rel]})
    with pytest.raises(errors.NotFound, match=f"hdfs://127.0.0.1:.*{ROOT}/nope does not exist"):
        await store.stat("nope")
    with pytest.raises(errors.NotFound):
        await RemoteStore(hdfs_cluster.uri + "/no/such/root").check()
    with pytest.raises(errors.NotADirectory):
        await RemoteStore(f"{hdfs_cluster.uri}{ROOT}/empty.bin").check()


def test_hadoop_settings_pass_through_and_others_are_refused(hdfs_cluster):
    uri = hdfs_cluster.uri + ROOT
    parsed = parse_uri(uri, {"dfs.client.socket-timeout": "3000"})
    assert parsed.options == {"dfs.client.socket-timeout": "3000"}
    with pytest.raises(errors.InvalidArgument, match="unknown option"):
        parse_uri(uri, {"socket_timeout": "3"})
    with pytest.raises(errors.InvalidArgument, match="client='jvm' must be native or libhdfs"):
        parse_uri(uri, {"client": "jvm"})


async def test_an_unreachable_namenode_fails_fast_with_a_clear_error():
    started = time.monotonic()
    store = RemoteStore(f"hdfs://127.0.0.1:{_free_port()}/data", timeout=20)
    with pytest.raises(errors.Unavailable, match="127.0.0.1"):
        await store.check()
    assert time.monotonic() - started < 15


# --- a name service (HA NameNodes): nn1 is dead, the client fails over to nn2 ----------------

NS = "cachefsNS"  # mixed case: Hadoop's keys (dfs.ha.namenodes.cachefsNS) are case-sensitive


async def every_byte_through(store: RemoteStore, tree: dict[str, bytes]) -> list[float]:
    """Checks the listing and every byte of `tree`; returns each call's seconds."""
    seconds = []
    started = time.monotonic()
    await store.check()  # the first call: nn1 refuses, the client moves to nn2
    seconds.append(time.monotonic() - started)
    found = await listing(store)
    assert {p: e.size for p, e in found.items() if not e.is_dir} == {
        rel: len(data) for rel, data in tree.items()
    }
    for rel, data in tree.items():
        started = time.monotonic()
        got = await store.read_version(rel, 0, len(data) + 10, found[rel].size, found[rel].mtime_ns)
        seconds.append(time.monotonic() - started)
        assert got == data, rel
    return seconds


async def test_a_name_service_from_options_fails_over_to_the_live_namenode(hdfs_cluster, tree):
    options = hdfs_cluster.nameservice_config(NS)
    store = RemoteStore(f"hdfs://{NS}{ROOT}", options)
    assert store.uri == f"hdfs://{NS}{ROOT}"  # the name service's case is kept
    seconds = await every_byte_through(store, tree)
    # hdfs-native tries nn1 once (refused at once on loopback), then stays with nn2.
    assert max(seconds) < 2, seconds


async def test_a_name_service_from_hadoop_conf_dir(hdfs_cluster, tree, tmp_path, monkeypatch):
    def site(props: dict[str, str]) -> str:
        body = "".join(f"<property><name>{k}</name><value>{v}</value></property>"
                       for k, v in props.items())  # fmt: skip
        return f'<?xml version="1.0"?><configuration>{body}</configuration>\n'

    (tmp_path / "core-site.xml").write_text(site({"fs.defaultFS": f"hdfs://{NS}"}))
    (tmp_path / "hdfs-site.xml").write_text(site(hdfs_cluster.nameservice_config(NS)))
    # hdfs-native reads HADOOP_CONF_DIR when a client is created (RemoteStore's constructor).
    monkeypatch.setenv("HADOOP_CONF_DIR", str(tmp_path))
    for uri in (f"hdfs://{NS}{ROOT}", f"hdfs://{ROOT}"):  # the name service; fs.defaultFS
        store = RemoteStore(uri)
        assert max(await every_byte_through(store, tree)) < 2


async def test_a_name_service_with_no_live_namenode_fails_fast_naming_it():
    dead = {f"dfs.namenode.rpc-address.{NS}.nn{i}": f"127.0.0.1:{_free_port()}" for i in (1, 2)}
    options = {"dfs.nameservices": NS, f"dfs.ha.namenodes.{NS}": "nn1,nn2", **dead}
    started = time.monotonic()
    store = RemoteStore(f"hdfs://{NS}/data", options, timeout=20)
    with pytest.raises(errors.Unavailable, match=f"cannot reach HDFS namenode {NS} for"):
        await store.check()
    assert time.monotonic() - started < 15
