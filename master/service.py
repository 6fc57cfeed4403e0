"""The master process: datasets, namespace snapshots and worker membership, served over RPC.

The master is not on the data path: clients ask it for metadata (cached on their side) and for
the live worker list, then talk to workers directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from cachefs import __version__
from cachefs.config import format_address
from cachefs.errors import InvalidArgument, NotFound
from cachefs.master.namespace import MetadataStore
from cachefs.master.registry import WorkerRegistry
from cachefs.meta import Attr
from cachefs.rpc import RpcServer
from cachefs.ufs import RemoteStore, parse_uri

log = logging.getLogger("cachefs.master")

READDIR_MAX = 5000
LOOKUP_MANY_MAX = 10_000


def _entries(page: list[tuple[str, Attr]]) -> list:
    return [[name, attr.to_wire()] for name, attr in page]


class MasterService:
    """RPC handlers (`rpc_*`) over the metadata store and the worker registry."""

    def __init__(self, state_dir: str | Path, *, liveness: float = 10.0):
        self.store = MetadataStore(state_dir)
        self.registry = WorkerRegistry(liveness=liveness, on_change=self.store.bump_epoch)
        self._sync_locks: dict[str, trio.Lock] = {}
        self._remotes: dict[str, RemoteStore] = {}

    def close(self) -> None:
        self.store.close()

    def remote(self, dataset: str) -> RemoteStore:
        info = self.store.dataset(dataset)
        remote = self._remotes.get(dataset)
        if remote is None:
            remote = self._remotes[dataset] = RemoteStore(info["uri"], info["options"])
        return remote

    # ---- datasets -------------------------------------------------------------------------

    async def rpc_dataset_add(self, name: str, uri: str, options: dict | None = None) -> dict:
        options = {str(k): str(v) for k, v in (options or {}).items()}
        parse_uri(uri, options)  # InvalidArgument before anything touches the network
        self.store.check_new_name(name)
        remote = RemoteStore(uri, options)
        await remote.check()  # NotFound / Unavailable with a one-line message
        info = self.store.add_dataset(name, uri, options)
        self._remotes[name] = remote
        log.info("dataset %s added: %s", name, uri)
        return info

    async def rpc_dataset_list(self) -> list[dict]:
        return self.store.datasets()

    async def rpc_dataset_info(self, name: str) -> dict:
        return self.store.dataset(name)

    async def rpc_dataset_remove(self, name: str) -> None:
        self.store.dataset(name)
        async with self._lock(name):
            await trio.to_thread.run_sync(self.store.remove_dataset, name)
        self._remotes.pop(name, None)
        self._sync_locks.pop(name, None)
        log.info("dataset %s removed", name)

    async def rpc_dataset_sync(self, name: str) -> dict:
        """Lists the remote tree and applies it incrementally; returns the counts."""
        remote = self.remote(name)
        async with self._lock(name):
            sync = self.store.begin_sync(name)
            async for batch in remote.iter_tree():
                await trio.to_thread.run_sync(sync.apply, batch)
            report = await trio.to_thread.run_sync(sync.finish)
        log.info("dataset %s synced: %s", name, report.as_dict())
        return report.as_dict()

    def _lock(self, name: str) -> trio.Lock:
        return self._sync_locks.setdefault(name, trio.Lock())

    # ---- namespace ------------------------------------------------------------------------

    async def rpc_root(self, dataset: str) -> list:
        return self.store.root(dataset).to_wire()

    async def rpc_lookup(self, dataset: str, parent: int, name: str) -> list:
        return self.store.lookup(dataset, parent, name).to_wire()

    async def rpc_lookup_many(self, dataset: str, items: list) -> list:
        if len(items) > LOOKUP_MANY_MAX:
            raise InvalidArgument(f"lookup_many takes at most {LOOKUP_MANY_MAX} items")
        found = self.store.lookup_many(dataset, ((int(p), str(n)) for p, n in items))
        return [attr.to_wire() if attr else None for attr in found]

    async def rpc_lookup_path(self, dataset: str, path: str) -> list:
        return self.store.lookup_path(dataset, path).to_wire()

    async def rpc_getattr(self, dataset: str, ino: int) -> list:
        return self.store.getattr(dataset, ino).to_wire()

    async def rpc_path_of(self, dataset: str, ino: int) -> str:
        return self.store.path_of(dataset, ino)

    async def rpc_readdir(
        self, dataset: str, ino: int, after: str | None = None, limit: int = 1000
    ) -> dict:
        page, more = self.store.readdir(dataset, ino, after, min(max(int(limit), 1), READDIR_MAX))
        return {"entries": _entries(page), "more": more}

    async def rpc_statfs(self, dataset: str) -> dict:
        info = self.store.dataset(dataset)
        return {"files": info["files"], "dirs": info["dirs"], "bytes": info["bytes"]}

    # ---- workers --------------------------------------------------------------------------

    async def rpc_worker_register(
        self, worker_id: str, address: str, host_id: str, capacity: dict | None = None
    ) -> dict:
        epoch = self.registry.register(worker_id, address, host_id, capacity or {})
        log.info("worker %s registered at %s (host %s)", worker_id, address, host_id)
        return {"epoch": epoch, "heartbeat": self.registry.liveness / 4}

    async def rpc_worker_heartbeat(self, worker_id: str, stats: dict | None = None) -> dict:
        if not self.registry.heartbeat(worker_id, stats or {}):
            raise NotFound(f"worker {worker_id} is not registered")
        return {"epoch": self.registry.epoch}

    async def rpc_worker_unregister(self, worker_id: str) -> None:
        self.registry.unregister(worker_id)

    async def rpc_workers(self) -> dict:
        return {
            "epoch": self.registry.epoch,
            "workers": [w.public() for w in self.registry.live()],
        }

    async def rpc_status(self) -> dict:
        return {
            "version": __version__,
            "datasets": self.store.datasets(),
            **(await self.rpc_workers()),
        }

    async def expire_workers(self) -> None:
        """Runs for the master's lifetime: drops workers whose heartbeats stopped."""
        while True:
            await trio.sleep(self.registry.liveness / 4)
            for worker_id in self.registry.expire():
                log.warning("worker %s missed its heartbeats; dropped", worker_id)


async def run_master(
    listen: tuple[str, int],
    state_dir: str | Path,
    *,
    secret: bytes | None = None,
    liveness: float = 10.0,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until cancelled; `task_status.started` gets the bound (host, port)."""
    service = MasterService(state_dir, liveness=liveness)
    try:
        async with trio.open_nursery() as nursery:
            server = RpcServer(service, secret=secret, name="master")
            bound = await nursery.start(server.serve, *listen)
            nursery.start_soon(service.expire_workers)
            log.info("master listening on %s, state in %s", format_address(bound), state_dir)
            task_status.started(bound)
    finally:
        service.close()
