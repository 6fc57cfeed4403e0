"""Admission: whether a new entry is worth the entries it would push out (pure policy).

TinyLFU (Einziger, Friedman, Manes; Caffeine's W-TinyLFU): a small count-min sketch estimates
how often each key was asked for recently; a candidate is admitted only if it was asked for
more often than every victim it would displace. A scan (an epoch over a dataset larger than
the cache, a one-off `find`) then passes through without flushing what is read repeatedly,
where LRU would evict everything once per pass and hit nothing on the next epoch.

The sketch: `depth` rows of 4-bit-range counters (kept in bytes, capped at 15), `width` a power
of two sized from the expected number of entries. Every `sample` increments, all counters are
halved ("aging"), so old popularity fades and a changed working set wins within a few samples.
Keys are the cache's 16-byte keys (already uniformly random digests): the row indexes come from
their bytes by double hashing, no extra hash function needed. Ties are refused: a candidate as
popular as its victims does not replace them (a repeated scan keeps the half it has).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FrequencySketch", "TinyLfu"]

COUNTER_MAX = 15


class FrequencySketch:
    """Approximate recent access counts of keys (count-min, aged)."""

    def __init__(self, entries: int, *, depth: int = 4, sample_factor: int = 10):
        if entries < 1 or depth < 1:
            raise ValueError("need entries >= 1 and depth >= 1")
        self.width = 1 << max(4, (entries - 1).bit_length())
        self.depth = depth
        self.sample = sample_factor * self.width
        self._rows = [bytearray(self.width) for _ in range(depth)]
        self._additions = 0

    def _slots(self, key: bytes) -> Iterable[tuple[bytearray, int]]:
        h1 = int.from_bytes(key[:8], "little")
        h2 = int.from_bytes(key[8:16], "little") | 1  # odd: every row a different slot
        mask = self.width - 1
        return ((row, (h1 + i * h2) & mask) for i, row in enumerate(self._rows))

    def frequency(self, key: bytes) -> int:
        return min(row[i] for row, i in self._slots(key))

    def increment(self, key: bytes) -> None:
        """One access of `key` (conservative update: only the smallest counters grow)."""
        slots = list(self._slots(key))
        low = min(row[i] for row, i in slots)
        if low < COUNTER_MAX:
            for row, i in slots:
                if row[i] == low:
                    row[i] = low + 1
        self._additions += 1
        if self._additions >= self.sample:
            self._age()

    def _age(self) -> None:
        for row in self._rows:
            row[:] = bytes(c >> 1 for c in row)
        self._additions //= 2


class TinyLfu:
    """Records accesses; decides admissions against the victims eviction would pick."""

    def __init__(self, entries: int):
        self.sketch = FrequencySketch(entries)
        self.admitted = 0
        self.rejected = 0

    def record(self, key: bytes) -> None:
        """A read of `key`, hit or miss (a miss counts: it is what makes a key worth caching)."""
        self.sketch.increment(key)

    def admit(self, candidate: bytes, victims: Iterable[bytes]) -> bool:
        """True if `candidate` was asked for more often than each of `victims`."""
        wanted = self.sketch.frequency(candidate)
        if all(wanted > self.sketch.frequency(v) for v in victims):
            self.admitted += 1
            return True
        self.rejected += 1
        return False
