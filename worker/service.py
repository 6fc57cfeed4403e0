"""The worker process: serves cached bytes over RPC and fills misses from the remote store.

The worker owns remote reads. A miss starts one fill task per cache key (single-flight): every
concurrent reader of that key waits for the same fill, and the fill runs in the service's own
nursery, so a reader that gives up (deadline, disconnect) never cancels it for the others.

Files up to BLOCK_SIZE are cached whole under their cache key; larger files as BLOCK_SIZE blocks
keyed by (cache key, block index), so a random read of a large file fetches only its blocks.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from cachefs import metrics
from cachefs.config import format_address
from cachefs.errors import CacheFsError, InvalidArgument, NotFound, Unavailable
from cachefs.meta import BLOCK_SIZE, MAX_READ, block_key, cache_key
from cachefs.rpc import Reply, RpcClient, RpcServer
from cachefs.shortcircuit import TOUCHED_MAX  # the client's cap is the call's
from cachefs.tls import TlsConfig
from cachefs.ufs import RemoteStore
from cachefs.worker.store import BlockStore

log = logging.getLogger("cachefs.worker")

FILL_PARALLELISM = 32  # remote reads a worker runs at once (benchmarks/results.md, cold path)
PREFETCH_MAX = 10_000
TOUCHED_DATASETS_MAX = 64
DATASET_TTL = 10.0  # seconds a worker trusts its copy of a dataset's URI


@dataclass
class _Fill:
    """One in-flight remote read that any number of readers wait on."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: CacheFsError | None = None


class WorkerService:
    def __init__(
        self,
        store: BlockStore,
        remote_for: Callable[[str], Awaitable[RemoteStore]],
        *,
        fill_parallelism: int = FILL_PARALLELISM,
    ):
        """`remote_for(dataset)` returns the RemoteStore of a dataset (asks the master)."""
        self.store = store
        self._remote_for = remote_for
        self._fills: dict[bytes, _Fill] = {}
        self._fill_limiter = trio.CapacityLimiter(fill_parallelism)
        self._nursery: trio.Nursery | None = None
        self.remote_reads = 0
        self.remote_bytes = 0
        # dataset -> [bytes served from the cache, bytes served after a remote fill]
        self.served: dict[str, list[int]] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Owns the fill tasks; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ---- the read path -------------------------------------------------------------------

    async def read(
        self,
        dataset: str,
        path: str,
        size: int,
        mtime_ns: int,
        offset: int,
        length: int,
        etag: str | None = None,
    ) -> tuple[bytes, bool]:
        """Bytes [offset, offset+length) of one version of a file; and whether all were hits."""
        if offset < 0 or length < 0 or length > MAX_READ:
            raise InvalidArgument(f"bad read range {offset}+{length}")
        end = min(offset + length, size)
        if offset >= end:
            return b"", True
        key = cache_key(dataset, path, size, mtime_ns, etag)
        version = (size, mtime_ns, etag)
        if size <= BLOCK_SIZE:
            data, hit = await self._object(key, dataset, path, version, 0, size)
            return data[offset:end], hit
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        parts: list = [None] * (last - first + 1)
        hits = []

        async def one(i: int) -> None:
            start = i * BLOCK_SIZE
            block_len = min(BLOCK_SIZE, size - start)
            data, hit = await self._object(
                block_key(key, i), dataset, path, version, start, block_len
            )
            lo, hi = max(offset, start) - start, min(end, start + block_len) - start
            parts[i - first] = data[lo:hi]
            hits.append(hit)

        if first == last:
            await one(first)
        else:
            async with trio.open_nursery() as nursery:
                for i in range(first, last + 1):
                    nursery.start_soon(one, i)
        return b"".join(parts), all(hits)

    async def _object(
        self, key: bytes, dataset: str, path: str, version: tuple, offset: int, length: int
    ) -> tuple[bytes, bool]:
        data = self.store.get(key)
        if data is not None:
            return data, True
        fill = self._fills.get(key)
        if fill is None:
            if self._nursery is None:
                raise Unavailable("worker is not running")
            fill = self._fills[key] = _Fill()
            self._nursery.start_soon(self._fill, key, fill, dataset, path, version, offset, length)
        await fill.done.wait()
        if fill.error is not None:
            raise fill.error
        return fill.data, False

    async def _fill(
        self, key: bytes, fill: _Fill, dataset: str, path: str, version, offset, length
    ) -> None:
        started = trio.current_time()
        try:
            remote = await self._remote_for(dataset)
            async with self._fill_limiter:
                self.remote_reads += 1
                # Only the version the key names may be cached under it (StaleVersion if not).
                data = await remote.read_version(path, offset, length, *version)
            self.remote_bytes += len(data)
            if len(data) != length:
                raise CacheFsError(
                    f"{path} changed in the remote store since the last sync "
                    f"(expected {length} bytes at {offset}, got {len(data)}); "
                    f"run `cachefs dataset sync {dataset}`"
                )
            self.store.put(key, data, dataset)
            metrics.FILL_SECONDS.observe(trio.current_time() - started)
            fill.data = data
        except CacheFsError as exc:
            fill.error = exc
        except Exception as exc:  # a bug, not a remote failure: keep serving, report EIO
            log.exception("fill of %s in %s failed", path, dataset)
            fill.error = CacheFsError(f"fill of {path} failed: {exc!r}")
        finally:
            del self._fills[key]
            fill.done.set()

    # ---- RPC -----------------------------------------------------------------------------

    async def rpc_read(
        self,
        dataset: str,
        path: str,
        size: int,
        mtime_ns: int,
        offset: int = 0,
        length: int = MAX_READ,
        etag: str | None = None,
    ) -> Reply:
        data, hit = await self.read(dataset, path, size, mtime_ns, offset, length, etag)
        self.served.setdefault(dataset, [0, 0])[0 if hit else 1] += len(data)
        (metrics.CACHE_HIT_BYTES if hit else metrics.CACHE_MISS_BYTES).inc(len(data))
        return Reply({"hit": hit}, data)

    def read_now(self, dataset: str, key: bytes, size: int) -> memoryview | None:
        """A whole small object if it is in the RAM tier, without waiting (an in-process
        client's fast path, embedded mode); None: use `read`. A view of the tier: reply with
        it before awaiting anything (BlockStore.get_from_memory)."""
        data = self.store.get_from_memory(key)
        if data is None or len(data) != size:
            return None
        self.served.setdefault(dataset, [0, 0])[0] += size
        metrics.CACHE_HIT_BYTES.inc(size)
        return data

    async def rpc_prefetch(self, dataset: str, files: list) -> dict:
        """Warms the cache with whole files: files = [[path, size, mtime_ns, etag], ...].

        Returns one outcome per file: "cached" (already there, no remote read), "fetched",
        or the error message.
        """
        if len(files) > PREFETCH_MAX:
            raise InvalidArgument(f"prefetch takes at most {PREFETCH_MAX} files per call")
        outcomes: list[str] = [""] * len(files)
        limiter = trio.Semaphore(64)

        async def one(i, path, size, mtime_ns, etag=None):
            if self.cached_bytes(dataset, path, size, mtime_ns, etag) == size:
                outcomes[i] = "cached"
                return
            async with limiter:
                try:
                    for start in range(0, max(size, 1), MAX_READ):
                        await self.read(dataset, path, size, mtime_ns, start, MAX_READ, etag)
                    outcomes[i] = "fetched"
                except CacheFsError as exc:
                    log.warning("prefetch of %s failed: %s", path, exc.message)
                    outcomes[i] = exc.message

        async with trio.open_nursery() as nursery:
            for i, entry in enumerate(files):
                nursery.start_soon(one, i, *entry)
        return {"outcomes": outcomes}

    async def rpc_cached_many(self, dataset: str, files: list) -> list[int]:
        """Cached bytes of each file version: files = [[path, size, mtime_ns, etag], ...]."""
        if len(files) > PREFETCH_MAX:
            raise InvalidArgument(f"cached_many takes at most {PREFETCH_MAX} files per call")
        return [self.cached_bytes(dataset, *entry) for entry in files]

    async def rpc_cached(self, dataset: str, path: str, size: int, mtime_ns: int, etag=None) -> int:
        """How many bytes of this file version are in the cache."""
        return self.cached_bytes(dataset, path, size, mtime_ns, etag)

    def cached_bytes(self, dataset, path, size, mtime_ns, etag=None) -> int:
        key = cache_key(dataset, path, size, mtime_ns, etag)
        if size <= BLOCK_SIZE:
            loc = self.store.location(key)
            return size if loc else 0
        total = 0
        for i in range((size + BLOCK_SIZE - 1) // BLOCK_SIZE):
            loc = self.store.location(block_key(key, i))
            total += loc.length if loc else 0
        return total

    async def rpc_touched(self, dataset_bytes: dict, keys: list) -> int:
        """Reads a same-host client served from this worker's files (short-circuit): each key
        counts as a use in the LRU, the bytes as cache hits. Returns how many keys are cached.

        Only datasets with cached entries are counted, so a peer cannot grow `served` with
        made-up names.
        """
        if not isinstance(keys, list) or len(keys) > TOUCHED_MAX:
            raise InvalidArgument(f"touched takes a list of at most {TOUCHED_MAX} keys")
        if not all(isinstance(k, bytes) and len(k) in (16, 20) for k in keys):
            raise InvalidArgument("touched: keys are 16- or 20-byte cache keys")
        if not isinstance(dataset_bytes, dict) or len(dataset_bytes) > TOUCHED_DATASETS_MAX:
            raise InvalidArgument(f"touched takes at most {TOUCHED_DATASETS_MAX} datasets")
        for name, n in dataset_bytes.items():
            if not isinstance(name, str) or type(n) is not int or not 0 <= n < 1 << 50:
                raise InvalidArgument("touched: dataset_bytes maps dataset names to byte counts")
        entries = self.store.counters.per_dataset_entries
        for name, n in dataset_bytes.items():
            if entries.get(name):
                self.served.setdefault(name, [0, 0])[0] += n
                metrics.CACHE_HIT_BYTES.inc(n)
        return sum(self.store.touch(key) for key in keys)

    async def rpc_evict(self, dataset: str | None = None, keys: list | None = None) -> int:
        if dataset is not None:
            return self.store.evict_dataset(dataset)
        return self.store.evict_keys([bytes(k) for k in keys or []])

    async def rpc_controls(self, controls: dict) -> bool:
        """The master's per-dataset controls, pushed when they change (worker/controls.py)."""
        self.store.controls.apply(controls)
        return True

    async def rpc_stats(self) -> dict:
        return self.stats()

    def stats(self) -> dict:
        return {
            **self.store.stats(),
            "worker_id": self.store.worker_id,
            "remote_reads": self.remote_reads,
            "remote_bytes": self.remote_bytes,
            "fills_in_flight": len(self._fills),
            "served": {ds: {"hit_bytes": h, "miss_bytes": m} for ds, (h, m) in self.served.items()},
            "controls": self.store.controls.stats(),
        }


class MasterLink:
    """The worker's side of membership: register, heartbeat, learn dataset URIs."""

    def __init__(self, client: RpcClient, store: BlockStore, host_id: str, fills: int):
        self.client = client
        self.store = store
        self.host_id = host_id
        self.fills = fills  # the worker's fill parallelism: its store calls are sized by it
        self.address = ""  # set once the RPC server is bound
        self.stats: Callable[[], dict] = store.stats
        self.interval = 2.5
        self._remotes: dict[str, tuple[tuple, RemoteStore, float]] = {}  # spec, store, until

    async def remote_for(self, dataset: str) -> RemoteStore:
        """The dataset's store; its URI is re-checked with the master every DATASET_TTL s."""
        known = self._remotes.get(dataset)
        if known is not None and trio.current_time() < known[2]:
            return known[1]
        info = await self.client.call("dataset_spec", name=dataset)  # with its credentials
        spec = (info["uri"], tuple(sorted(info["options"].items())))
        known = self._remotes.get(dataset)  # a fill that asked at the same time may have one
        if known is None or known[0] != spec:  # new, or removed and added again elsewhere
            # Calls in flight: every fill plus a hedge each.
            limiter = trio.CapacityLimiter(2 * self.fills)
            remote = RemoteStore(info["uri"], info["options"], limiter=limiter)
            known = (spec, remote, 0.0)
        self._remotes[dataset] = (known[0], known[1], trio.current_time() + DATASET_TTL)
        return known[1]

    async def register(self) -> None:
        reply = await self.client.call(
            "worker_register",
            worker_id=self.store.worker_id,
            address=self.address,
            host_id=self.host_id,
            capacity={name: tier.capacity for name, tier in self.store.tiers.items()},
            locality=self.store.locality(),
        )
        self.interval = reply["heartbeat"]
        self._apply_controls(reply)
        log.info(
            "registered with the master as %s (epoch %s)", self.store.worker_id, reply["epoch"]
        )

    def _apply_controls(self, reply: dict) -> None:
        try:
            self.store.controls.apply(reply.get("controls") if isinstance(reply, dict) else None)
        except CacheFsError as exc:
            log.warning("ignoring the master's dataset controls: %s", exc.message)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Registers, then heartbeats forever; re-registers when the master forgot us."""
        registered = False
        started = False
        while True:
            try:
                if not registered:
                    await self.register()
                    registered = True
                else:
                    reply = await self.client.call(
                        "worker_heartbeat", worker_id=self.store.worker_id, stats=self.stats()
                    )
                    self._apply_controls(reply)
            except NotFound:
                registered = False
                continue
            except Unavailable as exc:
                log.warning("master unreachable: %s", exc.message)
            cleared = self.store.index.reader_check()
            if cleared:
                log.info("freed %d lmdb reader slots of dead processes", cleared)
            if not started:  # readiness means "tried to register once", not "registered"
                started = True
                task_status.started()
            await trio.sleep(self.interval)


async def run_worker(
    master: tuple[str, int],
    listen: tuple[str, int],
    store: BlockStore,
    *,
    advertise: str | None = None,
    host_id: str | None = None,
    secret: bytes | None = None,
    tls: TlsConfig | None = None,
    local: dict | None = None,
    fill_parallelism: int | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until cancelled; `task_status.started` gets the bound (host, port).

    `local`, if given, receives the service as local["worker"], for in-process callers.
    """
    fills = fill_parallelism or FILL_PARALLELISM
    async with RpcClient(master, secret=secret, name="master", tls=tls) as client:
        link = MasterLink(client, store, host_id or socket.gethostname(), fills)
        service = WorkerService(store, link.remote_for, fill_parallelism=fills)
        if local is not None:
            local["worker"] = service
        link.stats = service.stats
        metrics.export_store(store.stats)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            await nursery.start(store.controls.run)  # TTL sweeps; stopped with the nursery
            server = RpcServer(service, secret=secret, name="worker", tls=tls)
            bound = await nursery.start(server.serve, *listen)
            host = bound[0] if bound[0] not in ("0.0.0.0", "::") else socket.gethostname()
            link.address = advertise or format_address((host, bound[1]))
            await nursery.start(link.run)
            task_status.started(bound)
