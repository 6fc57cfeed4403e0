"""The master process: datasets, namespace snapshots and worker membership, served over RPC.

The master is not on the data path: clients ask it for metadata (cached on their side) and for
the live worker list, then talk to workers directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from cachefs import __version__, metrics
from cachefs.config import format_address
from cachefs.credentials import load_or_create, publish, redact, unpublish
from cachefs.errors import CacheFsError, InvalidArgument, NotFound, PermissionDenied
from cachefs.master.console import Console
from cachefs.master.controls import ControlBook
from cachefs.master.jobs import LoadJobs, check_schedule, whole_dataset
from cachefs.master.namespace import MetadataStore
from cachefs.master.registry import WorkerRegistry
from cachefs.meta import Attr
from cachefs.rpc import RpcServer
from cachefs.runtime import private_dir
from cachefs.tls import TlsConfig
from cachefs.ufs import RemoteStore, parse_uri
from cachefs.workers import WorkerDirectory

log = logging.getLogger("cachefs.master")

READDIR_MAX = 5000
LOOKUP_MANY_MAX = 10_000


def _public(info: dict) -> dict:
    """A dataset's record as any client may see it: credentials shown as ***."""
    return {**info, "options": redact(info["options"])}


def _entries(page: list[tuple[str, Attr]]) -> list:
    return [[name, attr.to_wire()] for name, attr in page]


class MasterService:
    """RPC handlers (`rpc_*`) over the metadata store and the worker registry."""

    def __init__(self, state_dir: str | Path, *, liveness: float = 10.0):
        self.state_dir = Path(state_dir)
        self.store = MetadataStore(state_dir)
        self.controls = ControlBook(self.store)  # pin, quota, TTL per dataset
        self.registry = WorkerRegistry(liveness=liveness, on_change=self._membership_changed)
        # Workers known before a restart stay members (until they miss heartbeats), so clients
        # never see an empty cluster just because the master restarted.
        self.registry.restore(self.store.get_meta("workers") or [])
        self._sync_locks: dict[str, trio.Lock] = {}
        self._remotes: dict[str, RemoteStore] = {}
        # Set by run_master: clients for the live workers, and the load jobs.
        self.workers: WorkerDirectory | None = None
        self.jobs: LoadJobs | None = None
        self.console: Console | None = None

    def close(self) -> None:
        self.store.close()

    def _membership_changed(self) -> int:
        if hasattr(self, "registry"):  # not during the registry's own construction
            self.store.set_meta("workers", self.registry.snapshot())
        return self.store.bump_epoch()

    def remote(self, dataset: str) -> RemoteStore:
        info = self.store.dataset(dataset)
        remote = self._remotes.get(dataset)
        if remote is None:
            remote = self._remotes[dataset] = RemoteStore(info["uri"], info["options"])
        return remote

    # ---- datasets -------------------------------------------------------------------------

    async def rpc_dataset_add(self, name: str, uri: str, options: dict | None = None) -> dict:
        options = {str(k): str(v) for k, v in (options or {}).items()}
        # InvalidArgument before anything touches the network. Options given in the URI's
        # query join the others, so the stored URI (shown everywhere) carries no credential.
        parsed = parse_uri(uri, options)
        self.store.check_new_name(name)
        remote = RemoteStore(parsed.uri, parsed.options)
        await remote.check()  # NotFound / Unavailable with a one-line message
        info = self.store.add_dataset(name, parsed.uri, parsed.options)
        self._remotes[name] = remote
        log.info("dataset %s added: %s", name, parsed.uri)
        return _public(info)

    async def rpc_backup(self, path: str) -> dict:
        """Writes a copy of the state to `path`, which must lie in the state dir's backups/."""
        target = self._backup_target(path)
        size = await trio.to_thread.run_sync(self.store.backup, str(target))
        return {"bytes": size, "datasets": len(self.store.datasets()), "path": str(target)}

    def _backup_target(self, path: str) -> Path:
        """`path` as a file directly in STATE/backups (a bare name is taken from there).

        The master runs as root: a caller must not make it write anywhere else.
        """
        base = private_dir(self.state_dir / "backups").resolve()
        target = (base / path).resolve()
        if not path or target.parent != base:
            raise PermissionDenied(
                f"backups are written only into the master's state dir, {base}: give a file "
                f"name, not {path!r}"
            )
        return target

    def _shown(self, info: dict) -> dict:
        return {**_public(info), "controls": self.controls.get(info["name"])}

    async def rpc_dataset_list(self) -> list[dict]:
        return [self._shown(info) for info in self.store.datasets()]

    async def rpc_dataset_info(self, name: str) -> dict:
        return self._shown(self.store.dataset(name))

    async def rpc_dataset_set(self, name: str, changes: dict) -> dict:
        """Changes a dataset's controls (master/controls.py: pinned, quota_bytes, ttl_seconds;
        None clears the last two); saved, then pushed to the live workers at once (the others
        get them with their next heartbeat reply). Returns them and how many workers took them."""
        self.store.dataset(name)
        controls = self.controls.update(name, changes)
        pushed = await self._on_workers("controls", controls=self._controls_wire())
        return {"controls": controls, "workers": len(pushed),
                "applied": sum(result is True for result in pushed.values())}  # fmt: skip

    def _controls_wire(self) -> dict:
        return self.controls.for_workers(len(self.registry.live()))

    async def rpc_dataset_spec(self, name: str) -> dict:
        """URI and options with their credentials, for workers and mounts (authenticated);
        the last complete sync (None: never listed to the end)."""
        info = self.store.dataset(name)
        return {"uri": info["uri"], "options": info["options"], "last_sync": info["last_sync"]}

    async def rpc_dataset_remove(self, name: str) -> None:
        self.store.dataset(name)
        await self.rpc_dataset_clean(name)
        async with self._lock(name):
            await trio.to_thread.run_sync(self.store.remove_dataset, name)
        self.controls.forget(name)
        self._remotes.pop(name, None)
        self._sync_locks.pop(name, None)
        log.info("dataset %s removed", name)

    async def rpc_dataset_clean(self, name: str) -> dict:
        """Drops the dataset's cached data on every live worker."""
        self.store.dataset(name)
        evicted = await self._on_workers("evict", dataset=name)
        return {"evicted": sum(n for n in evicted.values() if isinstance(n, int)),
                "workers": len(evicted)}  # fmt: skip

    async def _on_workers(self, method: str, call_timeout: float = 10.0, **args) -> dict:
        """Calls every live worker at once; worker id -> result (or the error message)."""
        await self.workers.update()
        results: dict[str, object] = {}

        async def one(worker_id):
            try:
                client = await self.workers.client(worker_id)
                results[worker_id] = await client.call(method, timeout=call_timeout, **args)
            except CacheFsError as exc:
                results[worker_id] = exc.message

        async with trio.open_nursery() as nursery:
            for worker_id in list(self.workers.workers):
                nursery.start_soon(one, worker_id)
        return results

    async def rpc_dataset_sync(self, name: str) -> dict:
        """Lists the remote tree and applies it incrementally; returns the counts."""
        remote = self.remote(name)
        async with self._lock(name):
            sync = self.store.begin_sync(name)
            # The next page is listed while this one is written: the sync takes the longer of
            # the two, not their sum. One batch waits at most (bounded memory).
            send, receive = trio.open_memory_channel(1)

            async def list_tree() -> None:
                async with send:
                    async for batch in remote.iter_tree():
                        await send.send(batch)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(list_tree)
                async with receive:
                    async for batch in receive:
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

    async def rpc_changes(self, dataset: str, since: int) -> dict:
        return self.store.changes_since(dataset, since)

    async def rpc_statfs(self, dataset: str) -> dict:
        info = self.store.dataset(dataset)
        return {"files": info["files"], "dirs": info["dirs"], "bytes": info["bytes"]}

    # ---- workers --------------------------------------------------------------------------

    async def rpc_worker_register(
        self, worker_id: str, address: str, host_id: str, capacity: dict | None = None,
        locality: dict | None = None,
    ) -> dict:  # fmt: skip
        if locality is not None and not isinstance(locality, dict):
            raise InvalidArgument("locality must be a map")
        epoch = self.registry.register(worker_id, address, host_id, capacity or {}, locality)
        log.info("worker %s registered at %s (host %s)", worker_id, address, host_id)
        return {"epoch": epoch, "heartbeat": self.registry.liveness / 4,
                "controls": self._controls_wire()}  # fmt: skip

    async def rpc_worker_heartbeat(self, worker_id: str, stats: dict | None = None) -> dict:
        if not self.registry.heartbeat(worker_id, stats or {}):
            raise NotFound(f"worker {worker_id} is not registered")
        return {"epoch": self.registry.epoch, "controls": self._controls_wire()}

    async def rpc_worker_unregister(self, worker_id: str) -> None:
        self.registry.unregister(worker_id)

    async def rpc_workers(self) -> dict:
        return {
            "epoch": self.registry.epoch,
            "workers": [w.public() for w in self.registry.live()],
        }

    async def worker_stats(self) -> dict[str, dict]:
        """Live stats from every worker; the last heartbeat's for a worker that does not answer."""
        live = await self._on_workers("stats", call_timeout=3.0)
        last = {w.worker_id: w.stats for w in self.registry.live()}
        return {w: s if isinstance(s, dict) else last.get(w, {}) for w, s in live.items()}

    async def rpc_status(self) -> dict:
        stats = await self.worker_stats()
        datasets = []

        def total(section: str, name: str, field: str) -> int:
            return sum(s.get(section, {}).get(name, {}).get(field, 0) for s in stats.values())

        for info in map(self._shown, self.store.datasets()):
            name = info["name"]
            # Each file counted once, where readers look for it (its owner): copies left on
            # other workers after membership changes do not push the share past 100%.
            owned = await self.rpc_load_check(name)
            cached, files = owned["cached_bytes"], owned["cached_files"]
            hits, misses = total("served", name, "hit_bytes"), total("served", name, "miss_bytes")
            datasets.append({
                **info,
                "stored_bytes": total("datasets", name, "bytes"),  # all copies on all workers
                "cached_bytes": cached,
                "cached_files": files,
                "cached_percent": round(100 * cached / info["bytes"], 2) if info["bytes"] else 0,
                "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            })  # fmt: skip
        workers = []
        for w in self.registry.live():
            public = w.public()
            public["stats"] = stats.get(w.worker_id, w.stats)
            workers.append(public)
        return {
            "version": __version__,
            "datasets": datasets,
            "epoch": self.registry.epoch,
            "workers": workers,
            "now": self.registry.now(),  # the clock of the workers' last_seen
            "jobs": self.store.jobs(),
        }

    async def rpc_affinity(self, dataset: str) -> list[dict]:
        """Worker hosts ranked by their share of the dataset's cached bytes."""
        info = self.store.dataset(dataset)
        stats = await self.worker_stats()
        by_host: dict[str, int] = {}
        for w in self.registry.live():
            cached = stats.get(w.worker_id, {}).get("datasets", {}).get(dataset, {}).get("bytes", 0)
            by_host[w.host_id] = by_host.get(w.host_id, 0) + cached
        total = sum(by_host.values())
        ranked = sorted(by_host.items(), key=lambda kv: (-kv[1], kv[0]))
        return [
            {
                "host": host,
                "cached_bytes": cached,
                "share": round(cached / total, 4) if total else 0.0,
                "dataset_share": round(cached / info["bytes"], 4) if info["bytes"] else 0.0,
            }
            for host, cached in ranked
        ]

    async def rpc_console_url(self, host: str | None = None) -> str:
        """The console's login URL (it carries the console token: authenticated callers only).

        `host`: how the caller reaches this master, used when the console listens on 0.0.0.0.
        """
        if self.console is None:
            raise NotFound("this master serves no console (start it with --http HOST:PORT)")
        return self.console.login_url(host)

    # ---- load jobs ------------------------------------------------------------------------

    async def rpc_load_start(
        self,
        dataset: str,
        paths: list | None = None,
        files: list | None = None,
        replicas: int = 1,
        metadata_only: bool = False,
        every: float | None = None,
        cron: str | None = None,
        window: int | None = None,
    ) -> dict:
        schedule = check_schedule(every, cron)
        return self.jobs.submit(
            dataset, paths or [], files, replicas, metadata_only, schedule, window
        )

    async def rpc_job(self, job_id: int) -> dict:
        return self.store.job(job_id)

    async def rpc_jobs(self) -> list[dict]:
        return self.store.jobs()

    async def rpc_job_cancel(self, job_id: int) -> dict:
        return self.jobs.cancel(job_id)

    async def rpc_load_check(
        self, dataset: str, paths: list | None = None, files: list | None = None,
        replicas: int = 1,
    ) -> dict:  # fmt: skip
        """Cached share of the paths (on each file's owner) and the cluster's capacity for them
        (`LoadJobs.holdings`, as at the end of a load), without loading anything."""
        if type(replicas) is not int or replicas < 1:
            raise InvalidArgument("--replicas must be at least 1")
        if not all(isinstance(p, str) for p in paths or []):
            raise InvalidArgument("load_check: paths are strings")
        job = {"dataset": dataset, "paths": [p.strip("/") for p in paths or []] or [""],
               "files": files}  # fmt: skip
        plan = self.jobs.plan(job)
        return await self.jobs.holdings(dataset, plan, replicas, whole=whole_dataset(job))

    def gauges(self) -> dict:
        """Datasets, workers by state and jobs by state for the Prometheus gauges
        (cachefs/metrics.py), read in the scrape thread: reads only."""
        late = self.registry.now() - self.registry.liveness / 2  # 2 heartbeats missed
        workers = {"live": 0, "late": 0}
        for w in self.registry.live():
            workers["late" if w.last_seen < late else "live"] += 1
        jobs: dict[str, int] = {}
        for job in self.store.jobs():
            jobs[job["state"]] = jobs.get(job["state"], 0) + 1
        datasets = {d["name"]: {"files": d["files"], "bytes": d["bytes"]}
                    for d in self.store.datasets()}  # fmt: skip
        return {"datasets": datasets, "workers": workers, "jobs": jobs}

    async def expire_workers(self) -> None:
        """Runs for the master's lifetime: drops workers whose heartbeats stopped."""
        while True:
            await trio.sleep(self.registry.liveness / 4)
            for worker_id in self.registry.expire():
                log.warning("worker %s missed its heartbeats; dropped", worker_id)


async def _stop_on_cancel(stop) -> None:
    try:
        await trio.sleep_forever()
    finally:
        stop()


async def run_master(
    listen: tuple[str, int],
    state_dir: str | Path,
    *,
    secret: bytes | None = None,
    publish_secret: bool = False,
    tls: TlsConfig | None = None,
    liveness: float = 10.0,
    http: tuple[str, int] | None = None,
    local: dict | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until cancelled; `task_status.started` gets the bound (host, port).

    `secret` None means no authentication (the CLI's --insecure). With `publish_secret`, this
    user's clients on this host find the secret by the master's port (cachefs.credentials).
    `local`, if given, receives the service as local["master"], for in-process callers.
    """
    service = MasterService(state_dir, liveness=liveness)
    if local is not None:
        local["master"] = service
    bound = None
    metrics.export_master(service.gauges)
    try:
        async with (
            WorkerDirectory(service.rpc_workers, secret=secret, tls=tls) as workers,
            trio.open_nursery() as nursery,
        ):
            service.workers = workers
            service.jobs = LoadJobs(service, workers)
            await nursery.start(service.jobs.run)
            server = RpcServer(service, secret=secret, name="master", tls=tls)
            bound = await nursery.start(server.serve, *listen)
            if secret is not None and publish_secret:
                publish(bound[1], secret)
            nursery.start_soon(service.expire_workers)
            if http is not None:
                token = load_or_create(service.state_dir / "console-token").decode()
                console = Console(service, *http, trio.lowlevel.current_trio_token(), token=token)
                service.console = console
                console.start()
                nursery.start_soon(_stop_on_cancel, console.stop)
            log.info("master listening on %s, state in %s", format_address(bound), state_dir)
            task_status.started(bound)
    finally:
        metrics.export_master(None)
        if secret is not None and publish_secret and bound is not None:
            unpublish(bound[1], secret)
        service.close()
