"""Eviction policy (which cached objects go first) and the high/low watermark arithmetic.

Pure bookkeeping over keys and sizes: the store owns the bytes and removes what it evicts.
`EvictionPolicy` is the interface so LFU/ARC can be added beside `LruPolicy`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

__all__ = ["EvictionPolicy", "LruPolicy", "Watermarks"]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Tracks cached keys with their sizes and offers eviction candidates."""

    def insert(self, key: bytes, size: int, pinned: bool = False) -> None:
        """Add a key (or update an existing one's size/pin and count it as a use)."""

    def touch(self, key: bytes) -> None:
        """Record a hit; a missing key is ignored."""

    def remove(self, key: bytes) -> None:
        """Forget a key the store dropped; a missing key is ignored."""

    def victims(self) -> Iterator[bytes]:
        """Unpinned keys, coldest first. The caller removes what it actually evicts."""

    def set_pinned(self, key: bytes, pinned: bool) -> None:
        """Pin (never offered as a victim) or unpin a key; a missing key -> KeyError."""

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    @property
    def total_bytes(self) -> int:
        """Bytes of all tracked keys, pinned included."""
        ...

    @property
    def pinned_bytes(self) -> int: ...


class LruPolicy:
    """Least recently used first.

    Unpinned keys live in an OrderedDict from cold (front) to hot (end); pinned keys live in
    a plain dict outside that order, so walking victims never steps over a large pinned
    dataset. An unpinned key re-enters at the hot end: unpinning is not a sign of coldness.
    """

    def __init__(self) -> None:
        self._lru: OrderedDict[bytes, int] = OrderedDict()
        self._pinned: dict[bytes, int] = {}
        self._total = 0
        self._pinned_total = 0
        # Bumped on every change of the cold-to-hot order, so victims() can notice that the
        # caller evicted or touched something while it was suspended (see victims()).
        self._version = 0

    def insert(self, key: bytes, size: int, pinned: bool = False) -> None:
        if size < 0:
            raise ValueError(f"negative size {size}")
        self.remove(key)
        if pinned:
            self._pinned[key] = size
            self._pinned_total += size
        else:
            self._lru[key] = size
        self._total += size
        self._version += 1

    def touch(self, key: bytes) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)
            self._version += 1

    def remove(self, key: bytes) -> None:
        size = self._lru.pop(key, None)
        if size is None:
            size = self._pinned.pop(key, None)
            if size is None:
                return
            self._pinned_total -= size
        self._total -= size
        self._version += 1

    def set_pinned(self, key: bytes, pinned: bool) -> None:
        if pinned and key in self._lru:
            size = self._lru.pop(key)
            self._pinned[key] = size
            self._pinned_total += size
        elif not pinned and key in self._pinned:
            size = self._pinned.pop(key)
            self._pinned_total -= size
            self._lru[key] = size
        elif key not in self._lru and key not in self._pinned:
            raise KeyError(key)
        else:
            return  # already in the requested state
        self._version += 1

    def victims(self) -> Iterator[bytes]:
        """Unpinned keys from least to most recently used.

        The caller may remove, touch, insert or pin keys between items. After any such change
        the walk restarts from the cold end and skips keys already offered, so a key is
        offered at most once per iterator and nothing is missed. When the caller evicts every
        key it is offered the restart finds them gone and costs O(1) per key; keys it declines
        are stepped over again on each restart.
        """
        offered: set[bytes] = set()
        while True:
            version = self._version
            for key in self._lru:
                if key in offered:
                    continue
                offered.add(key)
                yield key
                if self._version != version:
                    break  # the OrderedDict changed: its iterator must not be advanced
            else:
                return

    def size_of(self, key: bytes) -> int:
        """Recorded size of `key`; KeyError if absent."""
        size = self._lru.get(key)
        return self._pinned[key] if size is None else size

    def is_pinned(self, key: bytes) -> bool:
        return key in self._pinned

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def __contains__(self, key: object) -> bool:
        return key in self._lru or key in self._pinned

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def pinned_bytes(self) -> int:
        return self._pinned_total


class Watermarks:
    """Evict once usage would pass `high` * capacity, down to `low` * capacity.

    The gap between the two makes eviction run in batches instead of once per insert.
    Thresholds are whole bytes (floored).
    """

    __slots__ = ("capacity", "high", "low", "high_bytes", "low_bytes")

    def __init__(self, capacity: int, high: float = 1.0, low: float = 0.97) -> None:
        if capacity < 0:
            raise ValueError(f"negative capacity {capacity}")
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"need 0 < low <= high <= 1, got low={low} high={high}")
        self.capacity = capacity
        self.high = high
        self.low = low
        self.high_bytes = int(high * capacity)
        self.low_bytes = int(low * capacity)

    def needs_eviction(self, used: int, incoming: int) -> bool:
        """True if storing `incoming` more bytes would put usage above the high watermark."""
        return used + incoming > self.high_bytes

    def target(self) -> int:
        """Usage to evict down to."""
        return self.low_bytes

    def bytes_to_free(self, used: int, incoming: int = 0) -> int:
        """How much to evict so that `used + incoming` ends at the low watermark (>= 0)."""
        return max(0, used + incoming - self.low_bytes)

    def __repr__(self) -> str:
        return f"Watermarks(capacity={self.capacity}, high={self.high}, low={self.low})"
