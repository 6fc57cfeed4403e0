"""The worker fills misses exactly once, survives restarts, heals corruption, never fails full.

In-process tests run a real WorkerService behind a real RPC server on loopback, reading a real
local directory through RemoteStore; the remote reads are counted by wrapping the real pyarrow
filesystem. Process tests run `cachefs master` and `cachefs worker` as separate processes.
"""

from __future__ import annotations

import os
import random
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cachefs.config import parse_address
from cachefs.errors import InvalidArgument, StaleVersion
from cachefs.rpc import RpcClient, RpcServer
from cachefs.ufs import RemoteStore
from cachefs.worker.service import WorkerService
from cachefs.worker.store import BlockStore
from tests.faults import FaultyFs
from tests.procs import master_process, run_cli, worker_process

MiB = 1 << 20


def write_files(root: Path, sizes: list[int], seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i, size in enumerate(sizes):
        rel = f"d{i // 100:03d}/f{i:05d}.bin"
        data = rng.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    return files


def flip_byte(path: Path, offset: int) -> None:
    """Corrupts one byte of a file through the file system, as a bad disk would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x55]))


@asynccontextmanager
async def served_worker(tmp_path: Path, source: Path, *, mem=64 * MiB, disk=0):
    """A WorkerService on a real RPC server; yields (client, service, counting fs)."""
    store = BlockStore(
        tmp_path / "state",
        mem_capacity=mem,
        disk_dir=tmp_path / "disk" if disk else None,
        disk_capacity=disk,
        shm_dir=tmp_path / "shm",
    )
    remote = RemoteStore(source.as_uri())
    counting = remote._fs = FaultyFs(remote._fs)

    async def remote_for(dataset):
        return remote

    service = WorkerService(store, remote_for)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            bound = await nursery.start(RpcServer(service).serve, "127.0.0.1", 0)
            async with RpcClient(bound, pool_size=2) as client:
                yield SnapshotReader(client, source), service, counting
            nursery.cancel_scope.cancel()
    finally:
        store.close()


class SnapshotReader:
    """Reads through the worker the file versions (size, mtime) seen when it was created,
    as a client reads the versions of its dataset snapshot."""

    def __init__(self, client: RpcClient, source: Path):
        self.client = client
        self.mtimes = {
            p.relative_to(source).as_posix(): p.stat().st_mtime_ns
            for p in source.rglob("*")
            if p.is_file()
        }

    async def read(self, rel, data, offset=0, length=None):
        return await self.client.call_with_payload(
            "read", dataset="ds", path=rel, size=len(data), mtime_ns=self.mtimes[rel],
            offset=offset, length=len(data) if length is None else length,
        )  # fmt: skip


async def test_single_flight_100_concurrent_reads_one_remote_read(tmp_path):
    source = tmp_path / "src"
    files = write_files(source, [3 * MiB])
    ((rel, data),) = files.items()
    async with served_worker(tmp_path, source) as (client, service, counting):
        results = []

        async def reader():
            results.append((await client.read(rel, data))[1])

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(reader)
        assert len(results) == 100 and all(r == data for r in results)
        assert counting.opens == 1
        assert service.stats()["remote_reads"] == 1


async def test_large_file_blocks_and_random_ranges(tmp_path):
    source = tmp_path / "src"
    files = write_files(source, [10 * MiB + 12345])
    ((rel, data),) = files.items()
    rng = random.Random(3)
    async with served_worker(tmp_path, source) as (client, service, counting):
        for _ in range(60):
            offset = rng.randrange(len(data))
            length = rng.choice([1, 4096, 1 * MiB, 5 * MiB])
            _, payload = await client.read(rel, data, offset=offset, length=length)
            assert payload == data[offset : offset + length]
        assert counting.opens == 3  # three blocks, each fetched once


async def test_corrupt_slot_on_disk_is_refetched(tmp_path):
    source = tmp_path / "src"
    files = write_files(source, [200_000])
    ((rel, data),) = files.items()
    async with served_worker(tmp_path, source, mem=0, disk=16 * MiB) as (client, svc, counting):
        assert (await client.read(rel, data))[1] == data
        loc = next(iter(svc.store._locations.values()))
        flip_byte(svc.store.tiers["disk"].path, loc.slot.offset + 1234)
        value, payload = await client.read(rel, data)
        assert payload == data and value == {"hit": False}
        assert svc.stats()["corrupt"] == 1
        assert counting.opens == 2
        assert (await client.read(rel, data)) == ({"hit": True}, data)


async def test_full_cache_64mib_256mib_twice(tmp_path):
    source = tmp_path / "src"
    rng = random.Random(11)
    sizes = []
    while sum(sizes) < 256 * MiB:
        sizes.append(min(int(rng.lognormvariate(11.5, 1.0)), 4 * MiB))
    files = write_files(source, sizes)
    async with served_worker(tmp_path, source, mem=64 * MiB) as (client, service, counting):
        sem = trio.Semaphore(8)
        peak = 0

        async def check(rel, data):
            nonlocal peak
            async with sem:
                assert (await client.read(rel, data))[1] == data
                used = service.store.tiers["mem"].used_bytes
                peak = max(peak, used)

        for _ in range(2):
            async with trio.open_nursery() as nursery:
                for rel, data in files.items():
                    nursery.start_soon(check, rel, data)
        assert peak <= 64 * MiB
        assert service.stats()["evictions"] > 0


async def test_changed_remote_file_is_an_error_not_stale_bytes(tmp_path):
    """An overwrite after the snapshot, even at the same size, is never served or cached."""
    source = tmp_path / "src"
    files = write_files(source, [5000, 7000])
    (same, data), (shorter, data2) = files.items()
    async with served_worker(tmp_path, source) as (client, service, counting):
        (source / same).write_bytes(bytes(5000))  # same size, new content and mtime
        os.utime(source / same, ns=(client.mtimes[same] + 10**9, client.mtimes[same] + 10**9))
        (source / shorter).write_bytes(b"short")
        for rel, old in ((same, data), (shorter, data2)):
            with pytest.raises(StaleVersion, match="changed in the remote store"):
                await client.read(rel, old)
        assert service.store.stats()["datasets"] == {}  # nothing was cached


def test_worker_process_restart_serves_1000_files_without_remote_reads(tmp_path):
    source = tmp_path / "src"
    files = write_files(source, [random.Random(i).randrange(1, 200_000) for i in range(1000)])
    master = master_process(tmp_path)
    master.start()
    worker = worker_process(
        tmp_path,
        master.address,
        "w1",
        "64M",
        "--disk",
        str(tmp_path / "w1-disk"),
        "--disk-size",
        "256M",
    )
    try:
        assert (
            run_cli("dataset", "add", "ds", source.as_uri(), "--master", master.address).returncode
            == 0
        )
        worker.start()
        mtimes = {rel: (source / rel).stat().st_mtime_ns for rel in files}

        async def read_all(expect_remote_reads):
            async with RpcClient(parse_address(worker.address), secret=master.secret) as client:

                async def one(rel):
                    _, payload = await client.call_with_payload(
                        "read", dataset="ds", path=rel, size=len(files[rel]),
                        mtime_ns=mtimes[rel], offset=0, length=len(files[rel]),
                    )  # fmt: skip
                    assert payload == files[rel]

                async with trio.open_nursery() as nursery:
                    for rel in files:
                        nursery.start_soon(one, rel)
                stats = await client.call("stats")
                assert stats["remote_reads"] == expect_remote_reads

        trio.run(read_all, 1000)
        worker.stop()
        shutil.rmtree(source)  # any remote read now would fail
        worker.start()
        trio.run(read_all, 0)

        async def registered():
            async with RpcClient(parse_address(master.address), secret=master.secret) as client:
                return await client.call("workers")

        live = trio.run(registered)["workers"]
        assert [w["address"] for w in live] == [worker.address]
    finally:
        worker.stop()
        master.stop()


async def test_touched_keys_survive_an_eviction_pass_that_takes_untouched_ones(tmp_path):
    """Short-circuit hints: what a same-host client read from the tier files counts as a use
    in the worker's LRU, and its bytes as cache hits."""
    source = tmp_path / "src"
    source.mkdir()
    async with served_worker(tmp_path, source, mem=16 * MiB) as (reader, service, _):
        store, client = service.store, reader.client
        for i in range(40):  # 10 MiB, key(0) the coldest
            assert store.put(i.to_bytes(16, "big"), random.randbytes(256 << 10), "ds")
        touched = [i.to_bytes(16, "big") for i in range(10)]  # the 10 coldest
        absent = (999).to_bytes(16, "big") + b"\0\0\0\0"
        count = await client.call(
            "touched", dataset_bytes={"ds": 12345, "unknown": 7}, keys=touched + [absent]
        )
        assert count == 10
        assert service.stats()["served"] == {"ds": {"hit_bytes": 12345, "miss_bytes": 0}}
        assert store.stats()["hits"] == 0  # hints are not gets
        for i in range(100, 140):  # 10 MiB more through a 16 MiB tier
            store.put(i.to_bytes(16, "big"), random.randbytes(256 << 10), "ds")
        assert store.stats()["evictions"] >= 10
        assert all(store.location(k) is not None for k in touched)
        # Plain LRU order after them: the untouched old keys went first.
        assert all(store.location(i.to_bytes(16, "big")) is None for i in range(10, 16))


@pytest.mark.parametrize(
    "args",
    [
        {"dataset_bytes": {}, "keys": [b"k" * 16] * 10_001},
        {"dataset_bytes": {}, "keys": [b"k" * 17]},
        {"dataset_bytes": {}, "keys": ["x" * 16]},
        {"dataset_bytes": {}, "keys": "not a list"},
        {"dataset_bytes": {1: 5}, "keys": []},
        {"dataset_bytes": {"ds": -1}, "keys": []},
        {"dataset_bytes": {"ds": True}, "keys": []},
        {"dataset_bytes": {f"d{i}": 1 for i in range(65)}, "keys": []},
        {"dataset_bytes": [], "keys": []},
    ],
)
async def test_touched_rejects_bad_hints(tmp_path, args):
    source = tmp_path / "src"
    source.mkdir()
    async with served_worker(tmp_path, source, mem=8 * MiB) as (reader, service, _):
        with pytest.raises(InvalidArgument):
            await reader.client.call("touched", **args)
        assert service.served == {}
