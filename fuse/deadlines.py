"""One watchdog per mount for the FUSE ops' deadlines, instead of a `trio.fail_after` per op.

A `fail_after` registers a deadline in trio's heap on entry and removes it on exit, for every
request; measured at ~7.7 µs per op against ~4.4 µs for a plain `CancelScope` (benchmarks/
results.md, "Lean FUSE request path"). Here an op that can block enters a plain scope and adds
it to `inflight` with its start time; one task wakes when the oldest op would expire and
cancels what is past `timeout`. Ops answered from memory take no scope at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


class Watchdog:
    """In-flight ops (their cancel scopes, by start time) and the deadline they share."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.timeout = timeout
        self.clock = clock
        # scope -> start time. Ops are added as they start, so insertion order is start order
        # and the first entry is always the next to expire.
        self.inflight: dict = {}

    def expire(self, now: float) -> float:
        """Cancels the ops past their deadline; returns the seconds until the next may expire."""
        inflight = self.inflight
        while inflight:
            scope = next(iter(inflight))
            left = inflight[scope] + self.timeout - now
            if left > 0:
                return left
            del inflight[scope]  # cancelled once; the op leaves on its next checkpoint
            scope.cancel()
        # Anything that starts from now on expires no earlier than a full timeout away.
        return self.timeout

    async def run(self) -> None:
        """Runs until cancelled (in the mount's nursery, so it stops with the mount)."""
        while True:  # a timer, not a wait for a condition: the next expiry is known
            delay = self.expire(self.clock())
            await trio.sleep(delay)
