"""The cold path with real processes: one store request per cold file, the directory and order
prefetch, and loads and reads over a store that fails, resets and stalls (a real S3 server
behind tests/store_proxy.py, which counts what reaches the store)."""

from __future__ import annotations

import time

from tests.fuse.conftest import make_files, read_all
from tests.fuse.test_load_and_sync import add_s3_dataset, cli, upload
from tests.store_proxy import StoreProxy


def dataset(cluster, moto_server, tmp_path, count, seed, **faults):
    """`count` files in a new bucket as dataset "ds" through a proxy; (master, proxy, digests)."""
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, count, max_size=30_000, seed=seed)
    proxy = StoreProxy(moto_server.endpoint, seed=seed, **faults)
    add_s3_dataset(master, "ds", upload(moto_server, source, digests), proxy)
    sizes = {rel: (source / rel).stat().st_size for rel in digests}
    return master, proxy, digests, sizes


def wait_for_gets(proxy, keys, seconds=15.0) -> None:
    deadline = time.monotonic() + seconds
    while not all(proxy.gets()[key] for key in keys):
        assert time.monotonic() < deadline, "the prefetch never reached the store"
        time.sleep(0.05)  # polling the store's counters, not a wait for readiness


def test_a_cold_read_is_one_get_and_warms_its_directory(cluster, mounts, tmp_path, moto_server):
    master, proxy, digests, sizes = dataset(cluster, moto_server, tmp_path, 100, seed=21)
    with proxy:
        mnt = mounts.mount("ds", "--master", master.address)
        proxy.reset_counts()
        clip = [rel for rel in sorted(digests) if rel.startswith("c000/v00001/")]
        assert read_all(mnt, clip[:1]) == {clip[0]: digests[clip[0]]}
        keys = {key.split("/data/", 1)[1]: key for key in proxy.gets()}
        assert set(keys) == {clip[0]}  # the read: one GET
        bucket_of = keys[clip[0]].split("/data/")[0]
        wait_for_gets(proxy, [f"{bucket_of}/data/{rel}" for rel in clip[1:]])  # its siblings

        assert read_all(mnt, digests) == digests
        counts = proxy.counts()
        nonempty = sum(1 for size in sizes.values() if size)
        assert counts["heads"] == 0 and counts["lists"] == 0
        assert len(proxy.gets()) == nonempty  # every file with data, fetched
        assert counts["gets"] <= 1.05 * nonempty  # once (or hedged)


def test_prefetch_off_fetches_only_what_is_read(cluster, mounts, tmp_path, moto_server):
    master, proxy, digests, _ = dataset(cluster, moto_server, tmp_path, 40, seed=22)
    with proxy:
        mnt = mounts.mount("ds", "--master", master.address, "--prefetch", "0")
        proxy.reset_counts()
        clip = [rel for rel in sorted(digests) if rel.startswith("c000/v00001/")]
        assert read_all(mnt, clip[:2]) == {rel: digests[rel] for rel in clip[:2]}
        time.sleep(1.0)  # a prefetch would have started by now
        assert proxy.counts()["gets"] == 2


def test_ordered_prefetch_fetches_the_list_once(cluster, tmp_path, moto_server):
    master, proxy, digests, sizes = dataset(cluster, moto_server, tmp_path, 120, seed=23)
    with proxy:
        order = sorted(digests, key=lambda rel: digests[rel])  # any order the readers choose
        listing = tmp_path / "order.txt"
        listing.write_text("\n".join(order[:80]) + "\n")
        proxy.reset_counts()
        result = cli(master, "prefetch", "ds", "--order", str(listing), "--window", "16")
        assert result.returncode == 0, result.stderr
        assert "80/80 files" in result.stdout and "0 failed" in result.stdout
        fetched = {key.split("/data/", 1)[1] for key in proxy.gets()}
        assert fetched == {rel for rel in order[:80] if sizes[rel]}
        assert proxy.counts()["gets"] <= 1.05 * len(fetched)


def test_load_and_reads_over_a_failing_resetting_stalling_store(
    cluster, mounts, tmp_path, moto_server
):
    master, proxy, digests, _ = dataset(cluster, moto_server, tmp_path, 150, seed=24)
    with proxy:
        mnt = mounts.mount("ds", "--master", master.address)
        faults = {"fail_rate": 0.2, "reset_rate": 0.2, "stall_rate": 0.1, "stall_seconds": 4.0}
        proxy.set(**faults)
        half = sorted(digests)[:75]
        assert read_all(mnt, half) == {rel: digests[rel] for rel in half}  # no reader error
        loaded = cli(master, "load", "ds")
        assert loaded.returncode == 0, loaded.stderr + loaded.stdout
        assert "150/150 files" in loaded.stdout and "0 failed" in loaded.stdout
        assert read_all(mnt, digests) == digests
        counts = proxy.counts()
        assert counts["failed"] and counts["reset"] and counts["stalled"]  # all three happened
