"""Mount lifecycle: cluster mounts, embedded mode (master + worker + client in one process),
the background daemon started by `cachefs mount`, and `cachefs umount`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio
import xxhash

from cachefs.config import format_address
from cachefs.errors import AlreadyExists, CacheFsError, InvalidArgument, NotFound
from cachefs.fuse.client import (  # noqa: F401 (MountOptions: the CLI's import)
    MountOptions,
    fuse_options,
    open_client,
    start_serve_loops,
)
from cachefs.fuse.operations import CacheFsOperations
from cachefs.fuse.serving import ServingHelpers, helper_spec
from cachefs.rpc import LocalClient
from cachefs.runtime import open_private, read_pid_file, runtime_dir, write_pid_file
from cachefs.ufs import parse_uri

log = logging.getLogger("cachefs.fuse.mount")

EMBEDDED_DATASET = "embedded"
READY_TIMEOUT = 120.0


def pid_file(mountpoint: Path) -> Path:
    digest = xxhash.xxh64_hexdigest(str(mountpoint).encode())
    return runtime_dir() / f"mount-{digest}.pid"


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise InvalidArgument(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise AlreadyExists(f"{mountpoint} is already a mount point (busy)")


async def serve_mount(
    dataset: str,
    master_address,
    mountpoint: Path,
    opts: MountOptions,
    *,
    local: dict | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Mounts `dataset` and serves until unmounted (or cancelled, which unmounts).

    `local` holds in-process services (embedded mode): "master" and "worker" are then called
    directly instead of over loopback RPC.
    """
    check_mountpoint(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        meta_path = pid_file(mountpoint).with_suffix(".meta")
        ops, workers, nursery = await open_client(
            stack, dataset, master_address, opts, meta_path, first=True, local=local
        )
        pyfuse3.init(ops, str(mountpoint), fuse_options(opts))
        try:
            start_serve_loops(nursery, ops, workers, opts)
            if opts.read_ahead_kb:
                nursery.start_soon(_set_read_ahead, ops, mountpoint, opts.read_ahead_kb)
            if opts.procs > 1:
                spec = helper_spec(dataset, master_address, opts, meta_path)
                helpers = ServingHelpers(spec, opts.procs - 1)
                nursery.start_soon(helpers.run, ops.initialized)
            log.info("dataset %s mounted on %s", dataset, mountpoint)
            task_status.started()
            await pyfuse3.main()
        finally:
            pyfuse3.close(unmount=True)
            nursery.cancel_scope.cancel()
        log.info("%s unmounted", mountpoint)


def mount_device(mountinfo: str, mountpoint: Path) -> str | None:
    """ "major:minor" of the mount on `mountpoint` in /proc/self/mountinfo text (the last one)."""
    # Fields: id, parent id, major:minor, root, mount point, ...; the mount point has space,
    # tab, newline and backslash octal-escaped.
    escaped = str(mountpoint)
    for char in "\\ \t\n":
        escaped = escaped.replace(char, f"\\{ord(char):03o}")
    found = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and fields[4] == escaped:
            found = fields[2]
    return found


async def _set_read_ahead(ops: CacheFsOperations, mountpoint: Path, kb: int) -> None:
    """Sets the mount's readahead once FUSE_INIT is answered: the kernel caps it at what INIT
    negotiated (its default, 128 KiB) when it takes the reply, so setting it earlier is lost.
    """
    await ops.initialized.wait()
    await trio.to_thread.run_sync(set_read_ahead, mountpoint, kb)


def set_read_ahead(mountpoint: Path, kb: int) -> None:
    """`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb` of the mount: fewer, larger reads of big files
    (benchmarks/results.md). A failure (not root, no sysfs) only costs speed: a warning.
    """
    try:
        with open("/proc/self/mountinfo") as f:
            device = mount_device(f.read(), mountpoint)
        if device is None:
            raise OSError(f"{mountpoint} not in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(f"{kb}\n")
        log.info("readahead of %s set to %d KiB", mountpoint, kb)
    except OSError as exc:
        log.warning("cannot set the readahead of %s to %d KiB: %s", mountpoint, kb, exc)


async def ensure_embedded_dataset(
    master, uri: str, options: dict[str, str], resync: bool = False
) -> None:
    """Adds (and so lists) the dataset on first use. Later mounts serve the snapshot they have
    without listing the store (as Alluxio does by default); `resync` lists it again
    (incremental), as `cachefs dataset sync` does.

    `master` is the in-process master (a LocalClient): embedded mode needs no socket for this.
    """
    wanted = parse_uri(uri, options)
    try:
        info = await master.call("dataset_spec", name=EMBEDDED_DATASET)
    except NotFound:
        info = None
    if info is not None and (info["uri"], info["options"]) != (wanted.uri, wanted.options):
        await master.call("dataset_remove", name=EMBEDDED_DATASET)
        info = None
    if info is None:
        info = await master.call("dataset_add", name=EMBEDDED_DATASET, uri=uri, options=options)
    if resync or not info.get("last_sync"):  # never listed completely yet
        report = await master.call("dataset_sync", name=EMBEDDED_DATASET, timeout=6 * 3600)
        log.info("embedded dataset synced: %s", report)


def embedded_state_dir(base: Path, uri: str) -> Path:
    """One state directory per URI, so embedded mounts of different datasets never share."""
    return base / "embedded" / xxhash.xxh64_hexdigest(uri.encode())


async def run_embedded(
    uri: str,
    options: dict[str, str],
    mountpoint: Path,
    state: Path,
    store_factory,
    opts: MountOptions,
    *,
    resync: bool = False,
    keep_cache: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Master + worker + FUSE client in this process; reports the master's address.

    The master and worker also serve RPC on loopback (for `cachefs load`, `status`, other
    clients), authenticated with `opts.secret` like any cluster; this process's own client
    calls them directly. Its tiers are removed when it ends (RAM given back), unless
    `keep_cache`; then a failed start still removes the tiers it created.
    """
    from cachefs.master.service import run_master
    from cachefs.worker.service import run_worker

    parse_uri(uri, options)
    check_mountpoint(mountpoint)
    local: dict = {}  # the services themselves, so the client calls them without sockets
    store = store_factory(state / "worker")  # first: a refused --mem fails before any listing
    started = False
    try:
        async with trio.open_nursery() as nursery:
            master = await nursery.start(
                functools.partial(
                    run_master, ("127.0.0.1", 0), state / "master", local=local,
                    secret=opts.secret, publish_secret=True,
                )
            )  # fmt: skip
            await ensure_embedded_dataset(LocalClient(local["master"]), uri, options, resync)
            await nursery.start(
                functools.partial(
                    run_worker, master, ("127.0.0.1", 0), store, local=local, secret=opts.secret
                )
            )
            await nursery.start(
                functools.partial(_serve_then_stop, local=local),
                nursery, EMBEDDED_DATASET, master, mountpoint, opts,
            )  # fmt: skip
            started = True
            task_status.started({"master": format_address(master), "secret_file": opts.secret_file})
            await trio.sleep_forever()
    finally:  # the services are done with the store: its tiers go (or stay) now
        failed_start = () if started else store.created  # what a failed start created goes
        store.close(remove=failed_start if keep_cache else store.tiers)


async def _serve_then_stop(
    scope_owner, dataset, master, mountpoint, opts, *, local=None, task_status
):
    """Serves the mount; when it is unmounted, stops everything else in the process too."""
    try:
        await serve_mount(dataset, master, mountpoint, opts, local=local, task_status=task_status)
    finally:
        scope_owner.cancel_scope.cancel()


async def run_cluster_mount(
    dataset: str,
    master,
    mountpoint: Path,
    opts: MountOptions,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_then_stop, nursery, dataset, master, mountpoint, opts)
        task_status.started()
        await trio.sleep_forever()


async def run_foreground(serve, mountpoint: Path) -> None:
    """Runs a mount until it is unmounted or the process gets SIGINT/SIGTERM (which unmount).

    `serve` may report facts at start (embedded mode: its master's address and secret file),
    which go into the pid file so `cachefs mount` can print them.
    """
    pidfile = pid_file(mountpoint)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status):
                try:
                    await serve(task_status=task_status)
                finally:  # unmounted from outside: the process is done
                    nursery.cancel_scope.cancel()

            facts = await nursery.start(serve_then_stop)
            write_pid_file(pidfile, mountpoint=str(mountpoint), **(facts or {}))
            print(f"cachefs mounted on {mountpoint}", flush=True)

            async def stop_on_signal():
                async for _ in signals:
                    pyfuse3.terminate()  # main() returns, close() unmounts, the rest stops
                    return

            nursery.start_soon(stop_on_signal)
            await trio.sleep_forever()
    pidfile.unlink(missing_ok=True)


# ---- the background daemon and umount ----------------------------------------------------


def spawn_background(argv: list[str], mountpoint: Path, log_path: Path) -> dict:
    """Starts `cachefs mount ... -f` detached; returns its pid record once the mount answers."""
    try:
        log_fd = open_private(log_path)  # never appends through a planted symlink
    except OSError as exc:
        raise CacheFsError(f"cannot open the mount log {log_path}: {exc.strerror}") from None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachefs.cli", *argv, "--foreground"],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise CacheFsError(tail[0].removeprefix("cachefs: error: ") if tail else "mount failed")
        if os.path.ismount(mountpoint):
            record = read_pid_file(pid_file(mountpoint))
            if record is not None and record["pid"] == proc.pid:
                return record
        time.sleep(0.05)  # polling the kernel's mount table; there is no event to wait on
    proc.kill()
    raise CacheFsError(f"mount of {mountpoint} did not become ready in {READY_TIMEOUT:.0f}s")


def unmount(mountpoint: Path, timeout: float = 30.0) -> None:
    """Unmounts and waits until the serving process has exited.

    Only a process the pid file proves to be this mount's cachefs process is waited for (and
    killed if it hangs): a forged or stale pid file names nobody.
    """
    if not os.path.ismount(mountpoint):
        raise InvalidArgument(f"{mountpoint} is not mounted")
    pidfile = pid_file(mountpoint)
    record = read_pid_file(pidfile)
    if record is not None and record.get("mountpoint") != str(mountpoint):
        record = None
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CacheFsError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    if record is None:
        return
    pid = record["pid"]
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            if read_pid_file(pidfile) == record:  # still that very process
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)  # waiting for another process to exit: no event to wait on
    pidfile.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our own child) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
