"""Resource limits of an RPC server: settings and the pure bookkeeping behind them (no I/O).

`cachefs.rpc_server` does the I/O; this module only decides. Two policies:

- `ByteBudget`: request bytes a server holds (frames being received plus requests not yet
  answered) across all its connections. A frame is charged in full as soon as its length
  prefix arrives, so memory is refused before it is allocated, not after. Frames up to
  `small_frame` bytes may use the whole budget, larger ones all but `small_reserve`: a few
  huge frames can never starve ordinary small calls.
- `ConnectionTable`: connections counted against a cap; when full, a newcomer takes the place
  of the connection idle the longest (no call in flight), or is refused if none is idle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

MiB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    """Per-server caps; the defaults suit a master or a worker on an ordinary host.

    - `max_connections`: open connections, handshaking ones included.
    - `max_buffered`: request bytes held across all connections.
    - `small_frame` / `small_reserve`: frames up to `small_frame` bytes may use the last
      `small_reserve` bytes of `max_buffered`; larger frames may not.
    - `frame_timeout`: seconds to receive the rest of a frame once its first byte arrived.
    - `idle_timeout`: seconds an authenticated connection may stay without a call in flight.
    """

    max_connections: int = 1024
    max_buffered: int = 128 * MiB
    small_frame: int = 64 << 10
    small_reserve: int = 16 * MiB
    frame_timeout: float = 30.0
    idle_timeout: float = 300.0

    def __post_init__(self):
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not 0 <= self.small_reserve < self.max_buffered:
            raise ValueError("small_reserve must be below max_buffered")
        if self.small_frame > self.max_buffered:
            raise ValueError("small_frame must not exceed max_buffered")
        if self.frame_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def large_frame_budget(self) -> int:
        """The most that frames above `small_frame` may hold together."""
        return self.max_buffered - self.small_reserve


class ByteBudget(Generic[K]):
    """Bytes reserved per holder (a connection) against one shared limit."""

    def __init__(self, limit: int, *, small_frame: int = 0, small_reserve: int = 0):
        self.limit = limit
        self.small_frame = small_frame
        self.small_reserve = small_reserve
        self.used = 0
        self.released = 0  # total ever released: tells the server when to return memory
        self._held: dict[K, int] = {}

    @classmethod
    def for_limits(cls, limits: ServerLimits) -> ByteBudget:
        return cls(
            limits.max_buffered,
            small_frame=limits.small_frame,
            small_reserve=limits.small_reserve,
        )

    def reserve(self, holder: K, n: int) -> bool:
        """Charge `n` bytes to `holder` if they fit; False (and no charge) if they do not."""
        cap = self.limit if n <= self.small_frame else self.limit - self.small_reserve
        if self.used + n > cap:
            return False
        self.used += n
        self._held[holder] = self._held.get(holder, 0) + n
        return True

    def release(self, holder: K, n: int) -> None:
        """Give back `n` of `holder`'s bytes (no-op for bytes already released with it)."""
        held = self._held.get(holder)
        if held is None:
            return
        n = min(n, held)
        self.used -= n
        self.released += n
        if held == n:
            del self._held[holder]
        else:
            self._held[holder] = held - n

    def release_all(self, holder: K) -> int:
        n = self._held.pop(holder, 0)
        self.used -= n
        self.released += n
        return n

    def held(self, holder: K) -> int:
        return self._held.get(holder, 0)


@dataclass(frozen=True)
class Admission(Generic[K]):
    admitted: bool
    #: the connection to close to make room (None: there was room)
    victim: K | None = None


class ConnectionTable(Generic[K]):
    """Open connections, their calls in flight and since when they have been idle.

    Callers pass `now`; it must never go backwards (the idle order relies on it).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._in_flight: dict[K, int] = {}
        # Connections with no call in flight -> idle since; oldest first (insertion order).
        self._idle: OrderedDict[K, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._in_flight)

    def __contains__(self, key: object) -> bool:
        return key in self._in_flight

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._in_flight))  # a copy: callers may close what they visit

    def idle_for(self, timeout: float, now: float) -> list[K]:
        """Connections idle for `timeout` or longer, longest idle first."""
        out = []
        for key, since in self._idle.items():  # oldest first: stop at the first fresh one
            if since + timeout > now:
                break
            out.append(key)
        return out

    def admit(self, key: K, now: float) -> Admission[K]:
        """Count a new connection in; when full, evict the longest idle one to make room."""
        victim = None
        if len(self._in_flight) >= self.capacity:
            if not self._idle:
                return Admission(False)
            victim = next(iter(self._idle))
            self.remove(victim)
        self._in_flight[key] = 0
        self._idle[key] = now
        return Admission(True, victim)

    def touch(self, key: K, now: float) -> None:
        """Restart an idle connection's idle clock (e.g. when it finishes authenticating)."""
        if key in self._idle:
            del self._idle[key]
            self._idle[key] = now

    def call_started(self, key: K) -> None:
        if key in self._in_flight:
            self._in_flight[key] += 1
            self._idle.pop(key, None)

    def call_finished(self, key: K, now: float) -> None:
        n = self._in_flight.get(key)
        if not n:
            return
        self._in_flight[key] = n - 1
        if n == 1:
            self._idle[key] = now

    def in_flight(self, key: K) -> int:
        return self._in_flight.get(key, 0)

    def idle_since(self, key: K) -> float | None:
        """When the connection last became idle; None while a call is in flight."""
        return self._idle.get(key)

    def remove(self, key: K) -> None:
        self._in_flight.pop(key, None)
        self._idle.pop(key, None)
