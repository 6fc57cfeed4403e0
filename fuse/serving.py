"""Several serving processes per mount (`--procs N`): one kernel connection, N Python processes.

One Python process tops out at one core, mostly in pyfuse3 and trio (benchmarks/results.md).
The first process mounts and answers FUSE_INIT; then it starts N-1 helpers (`python -m
cachefs.fuse.serving`) that serve the same connection:

- Each helper inherits the first process's /dev/fuse descriptor: one open file shared by all,
  so a request taken by a process that dies stays on the connection (a clone would fail it
  with ECONNABORTED when the dead process's descriptor closes). The descriptor is
  non-blocking: every process wakes when a request arrives, all but one find nothing to read
  (EAGAIN, which the patched pyfuse3 ignores).
- libfuse serves only after it has seen FUSE_INIT; the patched pyfuse3's `attach()` feeds the
  helper's libfuse a copy (the kernel drops its reply: no request has that id).
- Every process is stateless over the master's metadata (fuse/vfs.py reads by inode and asks
  the master for inodes it has not seen), so any process answers any request.
- When a helper dies, the requests it had taken would wait forever: the first process asks
  the kernel to queue them again (FUSE_NOTIFY_RESEND, Linux 6.9+; reads are idempotent) and
  starts a new helper. A helper does the same if the first process dies, and keeps serving.

The first process stays the oldest; the helpers are its children and end with the mount.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import sys
from pathlib import Path

import pyfuse3
import trio

from cachefs import metrics
from cachefs.config import format_address, parse_address
from cachefs.fuse.client import MountOptions, fuse_options, open_client, start_serve_loops
from cachefs.runtime import write_private
from cachefs.tls import TlsConfig

log = logging.getLogger("cachefs.fuse.serving")

FUSE_NOTIFY_RESEND = 7  # include/uapi/linux/fuse.h
RESTART_DELAY = 1.0  # a helper that dies at once must not spin
REPORT_EVERY = 2.0  # seconds between a helper's reports of its FUSE op counts
MAX_DEFAULT_PROCS = 4


def default_procs() -> int:
    """Serving processes when not told: one per two cores, at most 4.

    Every request wakes every process of the mount (they wait on one descriptor) and all but
    one find nothing: on 2 cores one process served a warm epoch 1.2-1.4x faster than two
    (benchmarks/results.md), so small hosts get one.
    """
    return max(1, min(MAX_DEFAULT_PROCS, (os.cpu_count() or 1) // 2))


def can_share_connection() -> bool:
    """True when pyfuse3 carries cachefs's patch (scripts/pyfuse3-3.5.0.patch)."""
    return hasattr(pyfuse3, "attach") and hasattr(pyfuse3, "session_fd_number")


def resend_pending(fd: int) -> bool:
    """Makes the kernel queue again every request taken by a process but not answered."""
    try:
        os.write(fd, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))
        return True
    except OSError as exc:  # unmounted meanwhile (ENODEV), or a kernel before 6.9
        log.warning("cannot ask the kernel to resend pending requests: %s", exc)
        return False


def helper_spec(dataset: str, master_address, opts: MountOptions, meta_path: Path) -> dict:
    """What a helper needs to serve like the first process (sent over a pipe, never argv)."""
    tls = opts.tls
    return {
        "dataset": dataset,
        "meta": str(meta_path),
        "master": format_address(master_address),
        "secret": opts.secret.hex() if opts.secret else None,
        "tls": None
        if tls is None
        else {
            "cert": tls.cert,
            "key": tls.key,
            "ca": tls.ca,
            "check_hostname": tls.check_hostname,
        },  # fmt: skip
        "entry_timeout": opts.entry_timeout,
        "attr_timeout": opts.attr_timeout,
        "op_timeout": opts.op_timeout,
        "change_poll": opts.change_poll,
        "prefetch": opts.prefetch,
        "allow_other": opts.allow_other,
        "log_level": logging.getLogger().getEffectiveLevel(),
    }


def helper_reports(meta_dir: Path) -> list[dict]:
    """Every helper's last counts, {"ops": FUSE ops, "fallbacks": read fallbacks} (of helpers
    gone too, so the mount's totals never go back); the mount's metrics add them to the first
    process's own."""
    reports = []
    for path in meta_dir.glob("ops-*.json"):
        try:
            report = json.loads(path.read_bytes())
        except (OSError, ValueError):  # replaced meanwhile, or the mount is going away
            continue
        if isinstance(report, dict):
            reports.append(report)
    return reports


async def _report_ops(meta_dir: Path) -> None:
    """A helper's FUSE op and read fallback counts, written for the first process every
    REPORT_EVERY seconds."""
    path = meta_dir / f"ops-{os.getpid()}.json"

    def report() -> None:
        counts = {
            "ops": metrics.FUSE_OPS.snapshot(),
            "fallbacks": metrics.READ_FALLBACKS.snapshot(),
        }
        write_private(path, json.dumps(counts).encode())

    try:
        while True:
            report()
            await trio.sleep(REPORT_EVERY)
    finally:  # the last counts, when the mount ends
        with contextlib.suppress(OSError):
            report()


class ServingHelpers:
    """The first process's helper processes: started once FUSE_INIT is answered, replaced
    when one dies; cancelling `run` stops them. The mount's metrics count their FUSE ops and
    read fallbacks."""

    def __init__(self, spec: dict, count: int):
        self.spec = spec
        self.count = count
        meta_dir = Path(spec["meta"])
        metrics.FUSE_OPS.reports = lambda: [r.get("ops", {}) for r in helper_reports(meta_dir)]
        metrics.READ_FALLBACKS.reports = lambda: [
            r.get("fallbacks", {}) for r in helper_reports(meta_dir)
        ]

    async def run(self, initialized: trio.Event) -> None:
        if not can_share_connection():
            log.warning("pyfuse3 lacks cachefs's patch (scripts/setup.sh): serving in 1 process")
            return
        await initialized.wait()
        fd = pyfuse3.session_fd_number()
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        payload = json.dumps({**self.spec, "fd": fd, "first_pid": os.getpid()}).encode()
        async with trio.open_nursery() as nursery:
            for _ in range(self.count):
                nursery.start_soon(self._keep_one, fd, payload)

    async def _keep_one(self, fd: int, payload: bytes) -> None:
        command = [sys.executable, "-m", "cachefs.fuse.serving"]
        while True:
            process = await trio.run_process(command, stdin=payload, check=False, pass_fds=(fd,))
            if process.returncode == 0:  # the mount is gone: the helper ended with it
                return
            log.warning("a serving process ended (%s)", process.returncode)
            if not resend_pending(fd):
                return
            await trio.sleep(RESTART_DELAY)


async def _resend_when_gone(pid: int, fd: int) -> None:
    """If the first process dies, its unanswered requests are queued again for the others."""
    pidfd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    log.warning("the mount's first process %d ended; resending its requests", pid)
    resend_pending(fd)


async def serve_helper(spec: dict) -> None:
    """A helper's life: the same client as the first process, on the inherited connection."""
    tls = TlsConfig.from_files(**spec["tls"]) if spec["tls"] else None
    opts = MountOptions(
        entry_timeout=spec["entry_timeout"], attr_timeout=spec["attr_timeout"],
        op_timeout=spec["op_timeout"], change_poll=spec["change_poll"],
        prefetch=spec["prefetch"], allow_other=spec["allow_other"], tls=tls,
        secret=bytes.fromhex(spec["secret"]) if spec["secret"] else None,
    )  # fmt: skip
    fd = spec["fd"]
    async with contextlib.AsyncExitStack() as stack:
        master = parse_address(spec["master"])
        ops, workers, nursery = await open_client(
            stack, spec["dataset"], master, opts, Path(spec["meta"]), first=False
        )
        pyfuse3.attach(ops, fd, fuse_options(opts))
        try:
            start_serve_loops(nursery, ops, workers, opts)
            nursery.start_soon(_resend_when_gone, spec["first_pid"], fd)
            nursery.start_soon(_report_ops, Path(spec["meta"]))
            await pyfuse3.main()
        finally:
            pyfuse3.close(unmount=False)
            nursery.cancel_scope.cancel()


def main() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    logging.basicConfig(
        level=spec["log_level"],
        format=f"%(asctime)s %(name)s[{os.getpid()}] %(levelname)s %(message)s",
    )
    trio.run(serve_helper, spec)


if __name__ == "__main__":
    main()
