"""Which worker owns a cache key: rendezvous (highest random weight) hashing.

Every client computes the same owner and the same fallback order from the key and the live
worker ids alone, so reads need no per-read call to the master, and when a worker leaves only
the keys it owned move (to their next-ranked worker).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import xxhash


def rank(key: bytes, worker_ids: Sequence[str]) -> list[str]:
    """Worker ids from owner to last fallback for this key."""
    if len(worker_ids) == 1:  # one worker (embedded mode, a one-host cluster): on every read
        return list(worker_ids)
    return sorted(
        worker_ids, key=lambda w: xxhash.xxh3_64_intdigest(key, seed=_seed(w)), reverse=True
    )


def owner(key: bytes, worker_ids: Sequence[str]) -> str | None:
    if not worker_ids:
        return None
    return max(worker_ids, key=lambda w: xxhash.xxh3_64_intdigest(key, seed=_seed(w)))


@functools.lru_cache(maxsize=4096)  # a worker's seed is asked on every read
def _seed(worker_id: str) -> int:
    return xxhash.xxh3_64_intdigest(worker_id.encode())
