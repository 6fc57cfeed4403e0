"""worker/admission.py: the frequency sketch and TinyLFU's admission decisions."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import pytest

from cachefs.worker.admission import COUNTER_MAX, FrequencySketch, TinyLfu


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def test_counts_grow_per_access_and_stop_at_the_cap():
    sketch = FrequencySketch(1000)
    for n in range(1, 6):
        sketch.increment(key(1))
        assert sketch.frequency(key(1)) == n
    for _ in range(40):
        sketch.increment(key(1))
    assert sketch.frequency(key(1)) == COUNTER_MAX
    assert sketch.frequency(key(2)) == 0


def test_aging_halves_every_counter_after_a_sample():
    sketch = FrequencySketch(16, sample_factor=1)  # a sample of `width` increments
    for _ in range(8):
        sketch.increment(key(1))
    assert sketch.frequency(key(1)) == 8
    for i in range(100, 100 + sketch.sample - 8):  # fill the sample with other keys
        sketch.increment(key(i))
    assert sketch.frequency(key(1)) == 4


def test_admission_needs_more_accesses_than_every_victim():
    lfu = TinyLfu(1000)
    for _ in range(3):
        lfu.record(key(1))
    lfu.record(key(2))
    for _ in range(3):
        lfu.record(key(3))
    assert lfu.admit(key(1), [key(2)])
    assert not lfu.admit(key(1), [key(2), key(3)])  # a tie with one victim refuses
    assert not lfu.admit(key(4), [key(2)])  # never asked for
    assert lfu.admit(key(4), [])  # nothing to displace
    assert (lfu.admitted, lfu.rejected) == (2, 2)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        FrequencySketch(0)


def hit_ratio(capacity: int, accesses: list[int], lfu: TinyLfu | None) -> float:
    """An entry-counted LRU cache, with TinyLFU admission or without."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for i in accesses:
        if lfu is not None:
            lfu.record(key(i))
        if i in cache:
            cache.move_to_end(i)
            hits += 1
            continue
        if len(cache) >= capacity:
            victim = next(iter(cache))
            if lfu is not None and not lfu.admit(key(i), [key(victim)]):
                continue
            del cache[victim]
        cache[i] = None
    return hits / len(accesses)


def test_repeated_scans_larger_than_the_cache_keep_a_part_with_admission():
    """Epochs over twice the cache in the same order: LRU evicts each file just before it is
    read again (no hits); with admission the cache keeps what it holds."""
    epochs = list(range(2000)) * 5
    assert hit_ratio(1000, epochs, None) == 0.0
    assert hit_ratio(1000, epochs, TinyLfu(1000)) > 0.35
