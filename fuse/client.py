"""One serving process's client side: master and worker clients, the Vfs and its Operations.

Every serving process of a mount builds the same thing here (the first one in
fuse/mount.py, the others in fuse/serving.py), then serves the kernel connection with it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from cachefs import metrics
from cachefs.errors import CacheFsError
from cachefs.fuse.metacache import MetaCache
from cachefs.fuse.operations import CacheFsOperations
from cachefs.fuse.prefetch import WINDOW as PREFETCH_WINDOW
from cachefs.fuse.prefetch import SiblingPrefetcher
from cachefs.fuse.reader import DataReader
from cachefs.fuse.vfs import Vfs
from cachefs.rpc import LocalClient, RpcClient
from cachefs.tls import TlsConfig
from cachefs.ufs import RemoteStore
from cachefs.workers import WorkerDirectory

log = logging.getLogger("cachefs.fuse.client")


@dataclass
class MountOptions:
    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    op_timeout: float = 60.0
    read_ahead_kb: int = 1024  # the mount's kernel readahead; 0 keeps the kernel's (128)
    allow_other: bool = False  # other users may read the mount only on request
    change_poll: float = 2.0  # seconds between polls for re-syncs
    prefetch: int = PREFETCH_WINDOW  # files warmed after a cold read in a directory; 0: off
    procs: int = 1  # serving processes of the mount (fuse/serving.py); the CLI's default: cores
    secret: bytes | None = None
    secret_file: str | None = None  # where `secret` came from (printed for embedded mounts)
    tls: TlsConfig | None = None  # cluster mounts; embedded mode stays on loopback


def fuse_options(opts: MountOptions) -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=cachefs", "subtype=cachefs", "ro"}
    if opts.allow_other:
        options.add("allow_other")
    return options


async def open_client(
    stack: contextlib.AsyncExitStack,
    dataset: str,
    master_address,
    opts: MountOptions,
    meta_path: Path,
    *,
    first: bool,
    local: dict | None = None,
) -> tuple[CacheFsOperations, WorkerDirectory, trio.Nursery]:
    """The Operations of one serving process, with what they need entered on `stack`.

    `meta_path` is the mount's shared metadata cache; the `first` process starts it empty and
    removes it when the mount ends.
    `local` holds in-process services (embedded mode): "master" and "worker" are then called
    directly instead of over loopback RPC. The nursery is the client's: readahead fetches and
    the background loops of `start_serve_loops` run there.
    """
    meta = MetaCache(meta_path, fresh=first)
    if first:  # runs after the close below (last in, first out)
        stack.callback(shutil.rmtree, meta_path, ignore_errors=True)
    stack.callback(meta.close)
    if local:
        master = LocalClient(local["master"], name="embedded master")
    else:
        master = await stack.enter_async_context(
            RpcClient(master_address, secret=opts.secret, name="master", tls=opts.tls)
        )
    workers = await stack.enter_async_context(
        WorkerDirectory(functools.partial(master.call, "workers"), secret=opts.secret, tls=opts.tls)
    )
    metrics.export_shortcircuit(workers.shortcircuit.counters)
    if local:
        worker = local["worker"]
        workers.local[worker.store.worker_id] = LocalClient(worker, name="embedded worker")
    nursery = await stack.enter_async_context(trio.open_nursery())
    await workers.update()
    remote: list[RemoteStore] = []

    async def direct() -> RemoteStore:
        if not remote:
            info = await master.call("dataset_spec", name=dataset)
            if not remote:  # another read may have made it while this one asked
                remote.append(RemoteStore(info["uri"], info["options"]))
        return remote[0]

    reader = DataReader(dataset, workers, direct)
    if opts.prefetch > 0:
        prefetcher = SiblingPrefetcher(dataset, master, workers, nursery, window=opts.prefetch)
        reader.on_miss = prefetcher.after_cold_read
    vfs = Vfs(dataset, master, reader, nursery, meta)
    await vfs.start()
    ops = CacheFsOperations(
        vfs,
        entry_timeout=opts.entry_timeout,
        attr_timeout=opts.attr_timeout,
        op_timeout=opts.op_timeout,
    )
    return ops, workers, nursery


def start_serve_loops(
    nursery: trio.Nursery, ops: CacheFsOperations, workers: WorkerDirectory, opts: MountOptions
) -> None:
    """The loops every serving process runs beside pyfuse3.main(), until the nursery ends."""
    nursery.start_soon(ops.watchdog.run)
    nursery.start_soon(workers.run)
    nursery.start_soon(watch_changes, ops, opts.change_poll)


async def watch_changes(ops: CacheFsOperations, interval: float) -> None:
    """Applies re-syncs of the dataset to the kernel's caches; runs until cancelled.

    Each serving process drops what it knows of: the kernel's entries came from any of them.
    """
    while True:
        await trio.sleep(interval)
        try:
            changed = await ops.apply_changes()
            if changed:
                log.info("a re-sync changed %d entries; kernel caches invalidated", changed)
        except CacheFsError as exc:
            log.warning("cannot poll the master for changes: %s", exc.message)
        except OSError as exc:  # the kernel refused an invalidation: keep serving
            log.warning("cache invalidation failed: %s", exc)
