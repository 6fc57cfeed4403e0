"""When to send a second, hedged GET for a read the store is slow to answer (pure policy).

A store's latency has a long tail (a stalled connection, a slow disk behind one object): a GET
that takes much longer than recent ones gets a twin, and the first answer wins. Hedging after
the 99th percentile of recent GETs costs ~1% more requests. When stalls are common (more than
1% of GETs), that percentile is itself a stall, so the wait is capped at a multiple of the
median; the floor keeps a fast store's ordinary jitter (and this process's own scheduling)
from doubling requests. A budget caps hedges at a share of all GETs: when the store is slow
because it is saturated, every GET looks late, and hedging them all would only add load.
"""

from __future__ import annotations

import bisect
from collections import deque


class HedgePolicy:
    """Recent GET latencies -> how long to wait before hedging (None: do not hedge yet)."""

    def __init__(
        self,
        *,
        quantile: float = 0.99,
        median_multiple: float = 4.0,
        floor: float = 0.2,
        window: int = 512,
        min_samples: int = 32,
        budget: float = 0.05,
        burst: float = 10.0,
    ):
        if not 0 < quantile < 1 or window < min_samples or min_samples < 1:
            raise ValueError("need 0 < quantile < 1 and 1 <= min_samples <= window")
        self.quantile = quantile
        self.median_multiple = median_multiple
        self.floor = floor
        self.min_samples = min_samples
        self._recent: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []
        # Hedge tokens: each GET earns `budget` of one, a hedge spends one; at most `burst`.
        self.budget = budget
        self.burst = burst
        self._tokens = burst

    def record(self, seconds: float) -> None:
        """The latency of a GET that succeeded (hedged or not)."""
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)

    def started(self) -> None:
        """A GET (not a hedge) was sent: it earns a share of a hedge."""
        self._tokens = min(self.burst, self._tokens + self.budget)

    def take_hedge(self) -> bool:
        """Whether a hedge may be sent now (spends from the budget if so)."""
        if self._tokens < 1.0 - 1e-9:  # 20 x 0.05 may sum to just under 1
            return False
        self._tokens -= 1.0
        return True

    def delay(self) -> float | None:
        """Seconds after which a GET still unanswered gets a hedge; None below min_samples."""
        n = len(self._sorted)
        if n < self.min_samples:
            return None
        tail = self._sorted[min(n - 1, int(self.quantile * n))]
        median = self._sorted[n // 2]
        return max(self.floor, min(tail, self.median_multiple * median))
