"""Talking to the live workers: membership, rendezvous ranking, one RPC client per worker.

Used by FUSE clients (membership from the master over RPC) and by the master itself (from its
registry). A worker that fails is ranked last for `SUSPECT_SECONDS`, so every call does not pay
for the same dead peer again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from cachefs import placement
from cachefs.errors import CacheFsError
from cachefs.locality import host_identity, is_local
from cachefs.rpc import RpcClient
from cachefs.shortcircuit import ShortCircuit
from cachefs.tls import TlsConfig

log = logging.getLogger("cachefs.workers")

SUSPECT_SECONDS = 5.0
WORKER_CALL_TIMEOUT = 20.0


class WorkerDirectory:
    """The live workers and one RPC client per worker.

    `fetch()` returns the membership as the master's `workers` call does:
    {"epoch": N, "workers": [{"id": ..., "address": ...}, ...]}.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[dict]],
        *,
        secret: bytes | None = None,
        tls: TlsConfig | None = None,
        refresh: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch = fetch
        self.secret = secret
        self.tls = tls
        self.refresh = refresh
        self.epoch = -1
        self.workers: dict[str, str] = {}  # id -> address
        # id -> (address, client, the scope that keeps the client open)
        self._clients: dict[str, tuple[str, RpcClient, trio.CancelScope]] = {}
        self._suspect_until: dict[str, float] = {}
        self._clock = clock
        #: id -> a client for workers in this very process (embedded mode): no sockets
        self.local: dict[str, object] = {}
        self._nursery_cm = trio.open_nursery()
        self._nursery: trio.Nursery | None = None
        #: id -> locality token of the workers whose files this process can read directly
        self.local_tokens: dict[str, dict] = {}
        # Owned here, like the RPC clients: the directory's owner closes both at unmount.
        self.shortcircuit = ShortCircuit()

    async def __aenter__(self):
        # Each worker client lives in a task of this nursery, so whichever task first needs
        # a client, the client's own connection tasks are owned here.
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc):
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(*exc)
        finally:
            self.shortcircuit.close()

    async def update(self) -> None:
        reply = await self._fetch()
        self.epoch = reply["epoch"]
        self.workers = {w["id"]: w["address"] for w in reply["workers"]}
        if self.shortcircuit.enabled:
            mine = host_identity()
            self.local_tokens = {
                w["id"]: w["locality"]
                for w in reply["workers"]
                if w["id"] not in self.local and is_local(w.get("locality"), mine)
            }
            self.shortcircuit.refresh(self.local_tokens)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keeps the worker list fresh and reports short-circuit reads; runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.refresh)
            try:
                await self.update()
            except CacheFsError as exc:
                log.warning("cannot refresh the worker list: %s", exc.message)
            await self.flush_touched()

    async def flush_touched(self) -> None:
        """Tells each local worker what this process read from its files since the last flush.

        The worker's LRU and `served` counters never see short-circuit reads otherwise. Best
        effort, as hints go: a failed send loses that round, and each send gives up after one
        refresh interval so a stuck worker does not hold up the membership refresh.
        """
        pending = self.shortcircuit.take_touched()
        async with trio.open_nursery() as nursery:
            for worker_id, (dataset_bytes, keys) in pending.items():
                if worker_id in self.workers:  # a departed worker's hints are dropped
                    nursery.start_soon(self._send_touched, worker_id, dataset_bytes, keys)

    async def _send_touched(self, worker_id: str, dataset_bytes: dict, keys: list) -> None:
        with trio.move_on_after(self.refresh):
            try:
                client = await self.client(worker_id)
                await client.call("touched", dataset_bytes=dataset_bytes, keys=keys)
            except (CacheFsError, KeyError) as exc:  # KeyError: the worker left meanwhile
                log.debug("short-circuit hints for worker %s not sent: %s", worker_id, exc)

    def ranked(self, key: bytes) -> list[str]:
        """Live workers for a key, owner first; suspects go last rather than away."""
        order = placement.rank(key, list(self.workers))
        if not self._suspect_until:
            return order
        now = self._clock()
        for worker_id, until in list(self._suspect_until.items()):
            if until <= now:  # suspicion over: the common case costs nothing again
                self._suspect_until.pop(worker_id, None)  # readers in other threads too
        healthy = [w for w in order if w not in self._suspect_until]
        return healthy + [w for w in order if w in self._suspect_until]

    def suspect(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = self._clock() + SUSPECT_SECONDS

    async def client(self, worker_id: str) -> RpcClient:
        if worker_id in self.local:
            return self.local[worker_id]
        address = self.workers[worker_id]
        known = self._clients.get(worker_id)
        if known is None or known[0] != address:  # new, or restarted on another port
            if known is not None:
                known[2].cancel()
            client, scope = await self._nursery.start(self._hold_client, worker_id, address)
            known = self._clients[worker_id] = (address, client, scope)
        return known[1]

    async def _hold_client(self, worker_id: str, address: str, *, task_status) -> None:
        with trio.CancelScope() as scope:
            async with RpcClient(
                address, secret=self.secret, tls=self.tls, pool_size=2, timeout=WORKER_CALL_TIMEOUT,
                name=f"worker {worker_id}",
            ) as client:  # fmt: skip
                task_status.started((client, scope))
                await trio.sleep_forever()
