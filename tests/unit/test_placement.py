"""Rendezvous hashing: deterministic, balanced, and minimal movement when a worker leaves."""

from collections import Counter

from cachefs.placement import owner, rank
from cachefs.workers import SUSPECT_SECONDS, WorkerDirectory


def keys(n):
    return [i.to_bytes(16, "big") for i in range(n)]


def test_order_is_deterministic_and_complete():
    workers = ["w1", "w2", "w3"]
    for key in keys(50):
        order = rank(key, workers)
        assert sorted(order) == sorted(workers)
        assert order == rank(key, list(reversed(workers)))
        assert order[0] == owner(key, workers)
    assert owner(b"k", []) is None and rank(b"k", []) == []


def test_balanced_across_workers():
    workers = [f"w{i}" for i in range(4)]
    counts = Counter(owner(k, workers) for k in keys(20_000))
    assert set(counts) == set(workers)
    assert max(counts.values()) < 1.15 * min(counts.values())


def test_only_the_departed_workers_keys_move():
    workers = ["a", "b", "c", "d"]
    before = {k: owner(k, workers) for k in keys(5000)}
    after = {k: owner(k, ["a", "b", "d"]) for k in keys(5000)}
    for k in before:
        if before[k] != "c":
            assert after[k] == before[k]
        else:
            assert after[k] == rank(k, workers)[1]  # the fallback a client already tried next


async def test_a_suspect_goes_last_until_its_suspicion_ends():  # the directory needs trio
    now = [100.0]
    directory = WorkerDirectory(None, clock=lambda: now[0])
    directory.workers = {"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3"}
    key = keys(1)[0]
    order = rank(key, ["a", "b", "c"])
    assert directory.ranked(key) == order
    directory.suspect(order[0])
    assert directory.ranked(key) == order[1:] + order[:1]
    now[0] += SUSPECT_SECONDS
    assert directory.ranked(key) == order


def test_one_worker_ranks_alone():
    assert rank(b"k", ["only"]) == ["only"]
