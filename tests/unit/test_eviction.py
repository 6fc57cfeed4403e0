"""LruPolicy ordering, pinning and accounting; Watermarks arithmetic."""

from __future__ import annotations

import pytest

from cachefs.worker.eviction import EvictionPolicy, LruPolicy, Watermarks


def make(*keys: bytes, size: int = 10) -> LruPolicy:
    p = LruPolicy()
    for k in keys:
        p.insert(k, size)
    return p


def test_is_an_eviction_policy() -> None:
    assert isinstance(LruPolicy(), EvictionPolicy)


def test_victims_in_insertion_order_when_untouched() -> None:
    assert list(make(b"a", b"b", b"c").victims()) == [b"a", b"b", b"c"]


def test_touch_moves_to_hot_end() -> None:
    p = make(b"a", b"b", b"c")
    p.touch(b"a")
    assert list(p.victims()) == [b"b", b"c", b"a"]
    p.touch(b"c")
    assert list(p.victims()) == [b"b", b"a", b"c"]
    p.touch(b"missing")  # ignored
    assert len(p) == 3


def test_reinsert_counts_as_use_and_updates_size() -> None:
    p = make(b"a", b"b")
    p.insert(b"a", 50)
    assert list(p.victims()) == [b"b", b"a"]
    assert p.total_bytes == 60
    assert p.size_of(b"a") == 50


def test_remove() -> None:
    p = make(b"a", b"b", b"c")
    p.remove(b"b")
    p.remove(b"missing")  # no-op
    assert list(p.victims()) == [b"a", b"c"]
    assert b"b" not in p and b"a" in p
    assert len(p) == 2 and p.total_bytes == 20


def test_pinned_never_offered() -> None:
    p = LruPolicy()
    p.insert(b"pinned", 100, pinned=True)
    p.insert(b"a", 10)
    p.insert(b"b", 10)
    p.set_pinned(b"a", True)
    assert list(p.victims()) == [b"b"]
    assert p.total_bytes == 120 and p.pinned_bytes == 110
    assert p.is_pinned(b"a") and b"pinned" in p and len(p) == 3
    p.touch(b"pinned")  # a hit on a pinned key is fine
    assert list(p.victims()) == [b"b"]


def test_unpin_reenters_at_hot_end() -> None:
    p = make(b"a", b"b", b"c")
    p.set_pinned(b"a", True)
    p.set_pinned(b"a", True)  # idempotent
    p.set_pinned(b"a", False)
    assert list(p.victims()) == [b"b", b"c", b"a"]
    assert p.pinned_bytes == 0 and p.total_bytes == 30
    with pytest.raises(KeyError):
        p.set_pinned(b"missing", True)


def test_remove_pinned_and_reinsert_unpinned() -> None:
    p = LruPolicy()
    p.insert(b"a", 7, pinned=True)
    p.insert(b"a", 5)  # reinsert decides the pin state
    assert p.pinned_bytes == 0 and p.total_bytes == 5
    p.set_pinned(b"a", True)
    p.remove(b"a")
    assert p.pinned_bytes == 0 and p.total_bytes == 0 and len(p) == 0


def test_victims_while_caller_evicts() -> None:
    """The store removes what it evicts mid-iteration; the walk continues in order."""
    p = make(*(bytes([i]) for i in range(10)))
    evicted = []
    for key in p.victims():
        evicted.append(key)
        p.remove(key)
        if p.total_bytes <= 40:
            break
    assert evicted == [bytes([i]) for i in range(6)]
    assert list(p.victims()) == [bytes([i]) for i in range(6, 10)]


def test_victims_skip_declined_and_survive_touches_and_inserts() -> None:
    p = make(b"a", b"b", b"c", b"d")
    seen = []
    for key in p.victims():
        seen.append(key)
        if key == b"a":
            continue  # declined (e.g. being read right now): stays, not offered again
        if key == b"b":
            p.touch(b"c")  # a hit elsewhere reorders: c is now hottest
            p.insert(b"e", 10)
            p.remove(key)
        else:
            p.remove(key)
    assert seen == [b"a", b"b", b"d", b"c", b"e"]
    assert list(p.victims()) == [b"a"]


def test_victims_empty() -> None:
    assert list(LruPolicy().victims()) == []


def test_negative_size_rejected() -> None:
    with pytest.raises(ValueError):
        LruPolicy().insert(b"a", -1)


def test_watermarks() -> None:
    w = Watermarks(1000)
    assert (w.high, w.low) == (1.0, 0.97)  # a tier runs full; a put past it frees 3 %
    assert not w.needs_eviction(950, 50)  # exactly full: fine
    assert w.needs_eviction(950, 51)
    assert w.target() == 970
    w = Watermarks(1000, high=0.95, low=0.85)
    assert not w.needs_eviction(900, 50)  # exactly at high: fine
    assert w.needs_eviction(900, 51)
    assert w.needs_eviction(1000, 0)
    assert w.target() == 850
    assert w.bytes_to_free(900, 51) == 101
    assert w.bytes_to_free(100, 0) == 0


def test_watermarks_custom_and_floored() -> None:
    w = Watermarks(999, high=0.5, low=0.25)
    assert w.high_bytes == 499 and w.target() == 249
    assert not w.needs_eviction(400, 99)
    assert w.needs_eviction(400, 100)
    assert Watermarks(1 << 40).target() == int(0.97 * (1 << 40))


@pytest.mark.parametrize(("high", "low"), [(0.8, 0.9), (1.1, 0.5), (0.5, 0.0), (0.9, -0.1)])
def test_watermarks_validation(high: float, low: float) -> None:
    with pytest.raises(ValueError):
        Watermarks(1000, high=high, low=low)
    with pytest.raises(ValueError):
        Watermarks(-1)
