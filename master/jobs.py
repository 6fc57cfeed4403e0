"""Load (preload) jobs: plan, dispatch to the owning workers, track progress, run on schedules.

A job loads the files under some paths (or a list) of a dataset into the cache. The master
plans it from its namespace, splits it by owning worker (rendezvous placement; with N replicas
the first N workers of each file's order) and sends batches to `prefetch` on the workers, which
fetch with their own bounded parallelism and retries. Progress lives in lmdb and only grows:
done + failed ends equal to the total. Files already cached count as done at no remote cost,
so re-running a load fetches only what is missing.

After the fills a job asks each file's owner what it still holds (`holdings`, the check behind
`cachefs load --check` too) and records it in `kept` beside the cluster's capacity: a dataset
larger than the cache is fetched in full and still mostly not kept, and the job says so.

Periodic jobs (`every` seconds or a `cron` expression) first sync the dataset's metadata, then
load; their schedule is persisted and resumed after a master restart.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import trio
from croniter import croniter

from cachefs import metrics
from cachefs.errors import CacheFsError, InvalidArgument, NotFound, Unavailable
from cachefs.meta import cache_key
from cachefs.workers import WorkerDirectory

if TYPE_CHECKING:
    from cachefs.master.service import MasterService

log = logging.getLogger("cachefs.master.jobs")

BATCH_FILES = 256
BATCHES_IN_FLIGHT_PER_WORKER = 4
ORDERED_BATCH_FILES = 32  # an ordered load's batches: small, so the order holds
MAX_FAILURES_KEPT = 100
CHECK_BATCH_FILES = 5000  # files per `cached_many` call of a holdings check
LOAD_RETRY_PAUSES = (1.0, 5.0)  # seconds before each new try of a batch's failed files
PROGRESS_SAVE_SECONDS = 0.5
COUNTERS = ("files", "bytes", "done_files", "done_bytes", "cached_files", "cached_bytes",
            "failed_files", "failed_bytes")  # fmt: skip


def next_run(schedule: dict, after: float) -> float:
    if "every" in schedule:
        return after + schedule["every"]
    return croniter(schedule["cron"], after).get_next(float)


def check_schedule(every: float | None, cron: str | None) -> dict | None:
    if every is not None and cron is not None:
        raise InvalidArgument("give --every or --cron, not both")
    if every is not None:
        if every <= 0:
            raise InvalidArgument("--every must be positive")
        return {"every": float(every)}
    if cron is not None:
        if not croniter.is_valid(cron):
            raise InvalidArgument(f"invalid cron expression {cron!r}")
        return {"cron": cron}
    return None


class LoadJobs:
    def __init__(self, service: MasterService, workers: WorkerDirectory):
        self.service = service
        self.store = service.store
        self.workers = workers
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[int, trio.CancelScope] = {}
        self._wakeups: dict[int, trio.Event] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Owns every job task; resumes unfinished and scheduled jobs after a restart."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for job in self.store.jobs():
                if job["state"] in ("running", "pending", "scheduled"):
                    log.info("resuming job %s (%s)", job["id"], job["state"])
                    nursery.start_soon(self._job_task, job["id"])
            task_status.started()
            await trio.sleep_forever()

    # ---- API -----------------------------------------------------------------------------

    def submit(
        self,
        dataset: str,
        paths: list[str],
        files: list[str] | None,
        replicas: int,
        metadata_only: bool,
        schedule: dict | None,
        window: int | None = None,
    ) -> dict:
        self.store.dataset(dataset)
        if replicas < 1:
            raise InvalidArgument("--replicas must be at least 1")
        if window is not None and (window < 1 or not files):
            raise InvalidArgument("--window needs an order (a list of files) and must be >= 1")
        job = {
            "dataset": dataset,
            "paths": [p.strip("/") for p in paths] or [""],
            "files": files,
            "window": window,  # files in flight, in the order of `files` (None: any order)
            "replicas": replicas,
            "metadata_only": metadata_only,
            "schedule": schedule,
            "state": "pending",
            "created": time.time(),
            "runs": 0,
            "next_run": time.time(),
            "progress": dict.fromkeys(COUNTERS, 0),
            "failures": [],
            "sync": None,
            "kept": None,  # after a load: what the owners still hold (LoadJobs.holdings)
            "error": None,
        }
        job = self.store.put_job(job)
        self._nursery.start_soon(self._job_task, job["id"])
        return job

    def cancel(self, job_id: int) -> dict:
        job = self.store.job(job_id)
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        job["state"] = "cancelled"
        self.store.put_job(job)
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.cancel()
        return job

    # ---- running -------------------------------------------------------------------------

    async def _job_task(self, job_id: int) -> None:
        with trio.CancelScope() as scope:
            self._scopes[job_id] = scope
            try:
                while True:
                    job = self.store.job(job_id)
                    if job["state"] == "cancelled":
                        return
                    await trio.sleep_until(_trio_deadline(job["next_run"]))
                    await self._run_once(job_id)
                    job = self.store.job(job_id)
                    if not job["schedule"] or job["state"] == "cancelled":
                        return
                    job["state"] = "scheduled"
                    job["next_run"] = next_run(job["schedule"], job["started"])
                    self.store.put_job(job)
            except NotFound:  # the dataset was removed under the job
                job = self.store.job(job_id)
                job.update(state="failed", error=f"dataset {job['dataset']!r} was removed")
                self.store.put_job(job)
            finally:
                self._scopes.pop(job_id, None)

    async def _run_once(self, job_id: int) -> None:
        job = self.store.job(job_id)
        job.update(state="running", started=time.time(), runs=job["runs"] + 1, error=None)
        job["progress"] = dict.fromkeys(COUNTERS, 0)
        job["failures"] = []
        job["kept"] = None
        self.store.put_job(job)
        try:
            if job["schedule"] or job["metadata_only"]:
                job["sync"] = await self.service.rpc_dataset_sync(job["dataset"])
            if not job["metadata_only"]:
                await self._load(job)
            job["state"] = "done"
        except CacheFsError as exc:
            job.update(state="failed", error=exc.message)
            log.warning("job %s failed: %s", job_id, exc.message)
        job["finished"] = time.time()
        if self.store.job(job_id)["state"] != "cancelled":
            self.store.put_job(job)

    def plan(self, job: dict) -> list[tuple[str, list]]:
        """(path, [path, size, mtime_ns, etag]) for every file the job covers."""
        dataset = job["dataset"]
        if job["files"]:
            out = []
            for path in job["files"]:
                attr = self.store.lookup_path(dataset, path)
                if not attr.is_dir:
                    out.append((path, [path, attr.size, attr.mtime_ns, attr.etag]))
            return out
        out = []
        for base in job["paths"]:
            attr = self.store.lookup_path(dataset, base)
            if not attr.is_dir:
                out.append((base, [base, attr.size, attr.mtime_ns, attr.etag]))
                continue
            for path, file_attr in self.store.iter_files(dataset, base, attr.ino):
                out.append((path, [path, file_attr.size, file_attr.mtime_ns, file_attr.etag]))
        return out

    async def holdings(
        self, dataset: str, plan: list, replicas: int = 1, *, whole: bool = True,
        usage: bool = False,
    ) -> dict:  # fmt: skip
        """What the owners hold now of the planned files, against what the cluster can hold.

        The one check behind `cachefs load --check`, `status` and the end of every load. Each
        file counts once, on its owner (where readers look): `cached_files` are whole files
        there, `cached_bytes` their bytes (parts of big files included). `capacity_bytes` is
        the sum of the live workers' tiers (a worker's tiers are exclusive), `need_bytes` the
        planned bytes times `replicas` (the copies a load keeps); `over` names the worker whose
        share of them exceeds its own capacity the most (None: every share fits). `whole`:
        the plan is the whole dataset. `usage`: when not every file is held, also count the bytes
        the live workers hold now, of every dataset (`used_bytes`; one stats call per worker).
        `quota_bytes`: the dataset's quota (master/controls.py), None without one.
        """
        await self.workers.update()
        live = {w.worker_id: w for w in self.service.registry.live()}
        capacity = {wid: sum(w.capacity.values()) for wid, w in live.items()}
        by_owner: dict[str, list] = defaultdict(list)
        need: dict[str, int] = defaultdict(int)
        for path, spec in plan:
            ranked = self.workers.ranked(cache_key(dataset, path, spec[1], spec[2], spec[3]))
            if ranked:
                by_owner[ranked[0]].append(spec)
            for worker_id in ranked[:replicas]:
                need[worker_id] += spec[1]
        result = {
            "files": len(plan), "bytes": sum(spec[1] for _, spec in plan),
            "cached_files": 0, "cached_bytes": 0,
            "whole": whole, "replicas": replicas, "need_bytes": sum(need.values()),
            "workers": len(capacity), "capacity_bytes": sum(capacity.values()),
            "over": None, "used_bytes": None,
            "quota_bytes": self.service.controls.get(dataset)["quota_bytes"],
        }  # fmt: skip
        over = [(n - capacity[w], w) for w, n in need.items() if w in capacity and n > capacity[w]]
        if over:
            wid = max(over)[1]
            result["over"] = {"worker": wid, "host": live[wid].host_id, "bytes": need[wid],
                              "capacity": capacity[wid]}  # fmt: skip
        for owner, specs in by_owner.items():
            try:
                client = await self.workers.client(owner)
                for i in range(0, len(specs), CHECK_BATCH_FILES):
                    chunk = specs[i : i + CHECK_BATCH_FILES]
                    cached = await client.call(
                        "cached_many", dataset=dataset, files=chunk, timeout=5.0
                    )
                    for spec, n in zip(chunk, cached, strict=True):
                        result["cached_bytes"] += n
                        result["cached_files"] += n == spec[1]
            except (CacheFsError, KeyError):  # a dead or departed owner holds nothing for readers
                self.workers.suspect(owner)
        if usage and result["cached_files"] < result["files"]:  # worth explaining
            stats = await self.service.worker_stats()
            result["used_bytes"] = sum(
                held.get("bytes", 0)
                for s in stats.values()
                for held in s.get("datasets", {}).values()
            )
        return result

    async def _load(self, job: dict) -> None:
        files = self.plan(job)
        await self.workers.update()
        if not self.workers.workers:
            raise Unavailable("no live workers to load into")
        # Each file's workers, ranked once, in the plan's order: [(spec, [worker_id, ...])].
        placed = []
        for path, spec in files:
            ranked = self.workers.ranked(cache_key(job["dataset"], path, spec[1], spec[2], spec[3]))
            placed.append((spec, ranked[: job["replicas"]]))
        # With replicas > 1 the counters count file copies (a file on 2 workers counts twice).
        progress = job["progress"]
        progress["files"] = sum(len(owners) for _, owners in placed)
        progress["bytes"] = sum(spec[1] * len(owners) for spec, owners in placed)
        saver = _ProgressSaver(self.store, job)
        if job.get("window"):
            await self._load_in_order(job, placed, saver)
        else:
            async with trio.open_nursery() as nursery:
                for worker_id, specs in _by_worker(placed).items():
                    nursery.start_soon(self._feed_worker, job, worker_id, specs, saver)
        saver.save(force=True)
        # The fills are done: what stayed? (A cache smaller than the files evicts the first
        # ones while it fetches the last; the job must not claim them.)
        job["kept"] = await self.holdings(
            job["dataset"], files, job["replicas"], whole=whole_dataset(job), usage=True
        )

    async def _load_in_order(self, job, placed, saver) -> None:
        """An order hint (`cachefs prefetch --order`): small batches in the readers' order, at
        most `window` files in flight, so the files needed first are fetched first."""
        size = max(1, min(ORDERED_BATCH_FILES, job["window"]))
        slots = trio.Semaphore(max(1, job["window"] // size))

        async def one(chunk, held):
            try:
                async with trio.open_nursery() as nursery:
                    for worker_id, specs in _by_worker(chunk).items():
                        # `slots` already bound the batches in flight: no limiter per worker
                        nursery.start_soon(
                            self._batch, job, worker_id, specs, saver, contextlib.nullcontext()
                        )
            finally:
                held.release()

        async with trio.open_nursery() as nursery:
            for i in range(0, len(placed), size):
                await slots.acquire()
                nursery.start_soon(one, placed[i : i + size], slots)

    async def _feed_worker(self, job, worker_id, specs, saver) -> None:
        limiter = trio.Semaphore(BATCHES_IN_FLIGHT_PER_WORKER)
        async with trio.open_nursery() as nursery:
            for i in range(0, len(specs), BATCH_FILES):
                nursery.start_soon(
                    self._batch, job, worker_id, specs[i : i + BATCH_FILES], saver, limiter
                )

    async def _batch(self, job, worker_id, chunk, saver, limiter) -> None:
        """One prefetch call's files, tried again while some fail; then counted."""
        outcomes = [""] * len(chunk)
        pending = list(range(len(chunk)))
        for pause in (*LOAD_RETRY_PAUSES, None):
            async with limiter:
                got = await self._prefetch(job["dataset"], worker_id, [chunk[i] for i in pending])
            for i, outcome in zip(pending, got, strict=True):
                outcomes[i] = outcome
            # A file fails the job only after these rounds: a flaky store or a worker that
            # restarts costs time, not files.
            pending = [i for i in pending if outcomes[i] not in ("fetched", "cached")]
            if not pending or pause is None:
                break
            await trio.sleep(pause)
        p = job["progress"]
        for spec, outcome in zip(chunk, outcomes, strict=True):
            state = outcome if outcome in ("fetched", "cached") else "failed"
            metrics.LOAD_FILES.labels(job["dataset"], state).inc()
            if outcome in ("fetched", "cached"):
                p["done_files"] += 1
                p["done_bytes"] += spec[1]
                if outcome == "cached":
                    p["cached_files"] += 1
                    p["cached_bytes"] += spec[1]
            else:
                p["failed_files"] += 1
                p["failed_bytes"] += spec[1]
                if len(job["failures"]) < MAX_FAILURES_KEPT:
                    job["failures"].append([spec[0], outcome])
        saver.save()

    async def _prefetch(self, dataset: str, worker_id: str, chunk: list) -> list:
        """Per file: "fetched", "cached", or an error message."""
        try:
            client = await self.workers.client(worker_id)
            reply = await client.call("prefetch", dataset=dataset, files=chunk, timeout=3600)
            return reply["outcomes"]
        except (Unavailable, KeyError) as exc:
            message = getattr(exc, "message", f"worker {worker_id} left")
            self.workers.suspect(worker_id)
            return [f"worker {worker_id} unavailable: {message}"] * len(chunk)


def whole_dataset(job: dict) -> bool:
    """True if the job covers the whole dataset (no file list, no paths but the root)."""
    return not job.get("files") and all(p.strip("/") == "" for p in job["paths"])


def _by_worker(placed) -> dict[str, list[list]]:
    """Files grouped by the workers they are loaded into, each group in the given order."""
    by_worker: dict[str, list[list]] = defaultdict(list)
    for spec, owners in placed:
        for worker_id in owners:
            by_worker[worker_id].append(spec)
    return by_worker


class _ProgressSaver:
    """Writes a running job's progress to lmdb at most every PROGRESS_SAVE_SECONDS."""

    def __init__(self, store, job: dict):
        self.store = store
        self.job = job
        self._last = 0.0

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_SAVE_SECONDS:
            self._last = now
            current = self.store.job(self.job["id"])
            if current["state"] != "cancelled":
                self.store.put_job(self.job)


def _trio_deadline(wall_time: float) -> float:
    return trio.current_time() + max(0.0, wall_time - time.time())
