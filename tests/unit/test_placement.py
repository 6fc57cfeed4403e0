"""Rendezvous hashing: deterministic, balanced, and minimal movement when a worker leaves."""

from collections import Counter

from cachefs.placement import owner, rank


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
