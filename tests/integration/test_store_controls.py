"""Per-dataset controls on a real BlockStore (slab files, lmdb index in temp dirs): quota
evictions stay inside the dataset, TTLs expire lazily and by the sweep, store times and the
last controls survive a restart. The clock is a test's (worker/controls.py reads time.time)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from cachefs.worker.store import BlockStore
from tests.integration.test_store import open_store as store_in

MiB = 1 << 20
OBJ = 100_000


class Clock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr("cachefs.worker.controls.time", SimpleNamespace(time=fake.time))
    return fake


def open_store(root: Path, mem: int = 32 * MiB, disk: int = 0) -> BlockStore:
    return store_in(root, mem, disk)


@pytest.fixture
def store(tmp_path, clock):
    s = open_store(tmp_path)
    yield s
    s.close()


def key(dataset: str, i: int) -> bytes:
    return dataset.encode().ljust(12, b".") + i.to_bytes(4, "big")


def controls(revision: int = 1, instance: str = "m1", **datasets) -> dict:
    return {"instance": instance, "revision": revision, "datasets": datasets}


def held(store: BlockStore, dataset: str) -> int:
    return store.counters.per_dataset[dataset]


def cached(store: BlockStore, dataset: str, count: int) -> list[int]:
    return [i for i in range(count) if key(dataset, i) in store._locations]


def test_a_quota_evicts_the_datasets_own_coldest_entries(store):
    for i in range(10):
        assert store.put(key("other", i), b"o" * OBJ, "other")
    store.controls.apply(controls(capped={"quota_bytes": MiB}))
    for i in range(10):  # 1,000,000 bytes: within the quota
        assert store.put(key("capped", i), b"c" * OBJ, "capped")
    assert store.get(key("capped", 0)) is not None  # now the hottest of its dataset
    assert store.put(key("capped", 10), b"c" * OBJ, "capped")
    # over the quota: trimmed to 95 % of it less the new entry, coldest first (1, then 2)
    assert cached(store, "capped", 11) == [0, *range(3, 11)]
    assert held(store, "capped") == 9 * OBJ <= MiB
    assert cached(store, "other", 10) == list(range(10))  # never another dataset's
    assert store.controls.stats()["quota_evictions"] == 2
    for i in range(11, 40):
        store.put(key("capped", i), b"c" * OBJ, "capped")
        assert held(store, "capped") <= MiB
    assert cached(store, "other", 10) == list(range(10))


def test_a_lowered_quota_trims_at_once_and_pinned_entries_are_kept(store):
    for i in range(10):
        store.put(key("a", i), b"a" * OBJ, "a")
    store.controls.apply(controls(a={"quota_bytes": 350_000}))
    assert held(store, "a") <= 350_000
    assert cached(store, "a", 10) == [7, 8, 9]  # the most recent stay

    store.controls.apply(controls(2, a={"pinned": True, "quota_bytes": 350_000}))
    assert "a" in store.pinned
    assert not store.put(key("a", 10), b"a" * OBJ, "a")  # pinned entries fill the quota
    assert cached(store, "a", 11) == [7, 8, 9]
    assert store.stats()["not_stored"] == 1
    store.controls.apply(controls(3, a={"quota_bytes": 50_000}))  # unpinned, lower
    assert cached(store, "a", 11) == []
    assert not store.put(key("a", 11), b"a" * OBJ, "a")  # larger than the whole quota
    store.controls.apply(controls(4))  # no controls at all: a quota no more
    assert store.put(key("a", 11), b"a" * OBJ, "a")


def test_a_ttl_expires_entries_lazily_and_by_the_sweep(store, clock):
    store.controls.apply(controls(short={"ttl_seconds": 10}))
    store.put(key("short", 1), b"1" * OBJ, "short")
    store.put(key("plain", 1), b"p" * OBJ, "plain")
    clock.now += 5
    store.put(key("short", 2), b"2" * OBJ, "short")
    clock.now += 5.5  # short/1 is 10.5 s old, short/2 5.5 s
    assert store.get(key("short", 1)) is None  # dropped when asked for
    assert store.location(key("short", 2)) is not None
    assert store.controls.stats()["expired"] == 1
    assert held(store, "short") == OBJ
    clock.now += 5
    assert store.controls.sweep() == 1  # short/2, never asked for
    assert held(store, "short") == 0 and "short" not in store.stats()["datasets"]
    assert store.get(key("plain", 1)) is not None  # no TTL: stays
    assert store.controls.stats()["expired"] == 2
    # a TTL set later counts from when entries were stored, not from when it was set
    clock.now += 100
    store.controls.apply(controls(2, plain={"ttl_seconds": 50}, short={"ttl_seconds": 10}))
    assert store.location(key("plain", 1)) is None
    # a refetched entry starts young again
    store.put(key("short", 1), b"1" * OBJ, "short")
    assert store.controls.sweep() == 0 and store.get(key("short", 1)) is not None


def test_store_times_and_controls_survive_a_restart(tmp_path, clock):
    s = open_store(tmp_path, mem=0, disk=32 * MiB)
    s.controls.apply(controls(keep={"pinned": True}, short={"ttl_seconds": 10}))
    s.put(key("keep", 1), b"k" * OBJ, "keep")
    s.put(key("short", 1), b"s" * OBJ, "short")
    s.controls.flush()  # the sweep task does this every few seconds
    clock.now += 4
    s.put(key("short", 2), b"s" * OBJ, "short")  # never saved: counts from the restart
    s.close()

    clock.now += 7  # short/1 is 11 s old
    s = open_store(tmp_path, mem=0, disk=32 * MiB)
    try:
        assert s.pinned == {"keep"}  # the last controls received, before the master answers
        assert s.controls.get("short").ttl_seconds == 10
        assert s.location(key("short", 1)) is None
        assert s.location(key("short", 2)) is not None
        assert s.location(key("keep", 1)) is not None
        clock.now += 10
        assert s.controls.sweep() == 1 and held(s, "short") == 0
    finally:
        s.close()


def test_an_older_reply_never_undoes_a_newer_one(store):
    store.put(key("a", 1), b"a" * OBJ, "a")
    assert store.controls.apply(controls(5, a={"pinned": True}))
    assert store.tiers["mem"].policy.is_pinned(key("a", 1))
    assert not store.controls.apply(controls(4))  # a heartbeat reply sent before the push
    assert store.pinned == {"a"}
    assert not store.controls.apply(controls(5, a={"pinned": True}))  # nothing new
    assert store.controls.apply(controls(0, instance="m2"))  # a restarted master
    assert store.pinned == set()
    assert not store.tiers["mem"].policy.is_pinned(key("a", 1))


def test_store_times_of_evicted_entries_are_forgotten(tmp_path, clock):
    s = open_store(tmp_path, mem=4 * MiB)  # one slab: about a thousand 4 KiB entries
    try:
        for i in range(20_000):
            s.put(key("churn", i), b"x" * 4000, "churn")
        live = len(s._locations)
        assert 0 < live <= 1024
        assert s.controls._stamped <= 2 * live + 4096
        assert s.controls._stamped == sum(map(len, s.controls._stamps.values()))
    finally:
        s.close()


async def test_the_sweep_task_expires_entries_until_stopped(tmp_path):
    s = open_store(tmp_path, mem=8 * MiB)
    try:
        s.controls.apply(controls(short={"ttl_seconds": 0.3}))
        s.put(key("short", 1), b"s" * OBJ, "short")
        async with trio.open_nursery() as nursery:
            await nursery.start(s.controls.run)
            with trio.fail_after(5):
                while key("short", 1) in s._locations:  # not via the store: no lazy expiry  # noqa: ASYNC110
                    await trio.sleep(0.05)
            s.controls.stop()
        assert s.controls.stats()["expired"] == 1
        assert list(s.index.stamps()) == []  # the expired entry's saved time is gone too
    finally:
        s.close()
