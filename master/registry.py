"""Worker membership: who is alive, and an epoch that changes whenever the answer changes.

Pure bookkeeping with an injectable clock, so the liveness rules get plain unit tests. Workers
are not persisted: after a master restart they learn from their next heartbeat that they are
unknown and register again (the epoch itself is persisted by the caller so it only grows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class WorkerInfo:
    worker_id: str
    address: str  # host:port its RPC server listens on
    host_id: str  # the node it runs on (for locality and affinity)
    capacity: dict = field(default_factory=dict)  # bytes per tier
    stats: dict = field(default_factory=dict)  # last heartbeat's stats
    registered_at: float = 0.0
    last_seen: float = 0.0
    locality: dict | None = None  # where its files are, for same-host short-circuit reads

    def public(self) -> dict:
        return {
            "id": self.worker_id,
            "address": self.address,
            "host": self.host_id,
            "capacity": self.capacity,
            "stats": self.stats,
            "last_seen": self.last_seen,
            **({"locality": self.locality} if self.locality else {}),
        }


class WorkerRegistry:
    def __init__(
        self,
        *,
        liveness: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], int] | None = None,
    ):
        """`liveness`: seconds without a heartbeat after which a worker counts as dead.
        `on_change` returns the next epoch (the master persists it); defaults to counting."""
        self.liveness = liveness
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._next_epoch = on_change or self._count
        self.epoch = self._next_epoch()

    def _count(self) -> int:
        self._counter = getattr(self, "_counter", 0) + 1
        return self._counter

    def _changed(self) -> None:
        self.epoch = self._next_epoch()

    def register(
        self, worker_id: str, address: str, host_id: str, capacity: dict,
        locality: dict | None = None,
    ) -> int:  # fmt: skip
        now = self._clock()
        old = self._workers.get(worker_id)
        self._workers[worker_id] = WorkerInfo(
            worker_id, address, host_id, dict(capacity), {}, now, now, locality
        )
        if old is None or (old.address, old.host_id, old.locality) != (
            address, host_id, locality,
        ):  # fmt: skip
            self._changed()
        return self.epoch

    def heartbeat(self, worker_id: str, stats: dict) -> bool:
        """False when the worker is unknown (expired or master restarted): it must register."""
        info = self._workers.get(worker_id)
        if info is None:
            return False
        info.last_seen = self._clock()
        info.stats = stats
        return True

    def unregister(self, worker_id: str) -> None:
        if self._workers.pop(worker_id, None) is not None:
            self._changed()

    def expire(self) -> list[str]:
        """Drops workers whose heartbeats stopped; returns their ids."""
        deadline = self._clock() - self.liveness
        dead = [w for w, info in self._workers.items() if info.last_seen < deadline]
        for worker_id in dead:
            del self._workers[worker_id]
        if dead:
            self._changed()
        return dead

    def snapshot(self) -> list[dict]:
        """The membership to persist: enough to restore it after a master restart."""
        return [
            {
                "id": w.worker_id,
                "address": w.address,
                "host": w.host_id,
                "capacity": w.capacity,
                "locality": w.locality,
            }  # fmt: skip
            for w in self._workers.values()
        ]

    def restore(self, members: list[dict]) -> None:
        """Takes back the workers a previous master knew, as if each had just heartbeated: they
        stay live if they keep heartbeating and expire after `liveness` if they do not."""
        now = self._clock()
        for m in members:
            self._workers[m["id"]] = WorkerInfo(
                m["id"],
                m["address"],
                m["host"],
                dict(m["capacity"]),
                {},
                now,
                now,
                m.get("locality"),  # absent in snapshots of older masters
            )

    def now(self) -> float:
        return self._clock()

    def live(self) -> list[WorkerInfo]:
        return sorted(self._workers.values(), key=lambda info: info.worker_id)
