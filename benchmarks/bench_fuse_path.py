"""What does a FUSE request cost the mount process, before and after a change, side by side?

Mounts the same local dataset (bench_read.py's size mix, `file://`) several times at once in
embedded mode, one mount per variant: a checkout of cachefs (e.g. a `git worktree` of the commit
before a change, and one of the change) plus extra `cachefs mount` flags. After one cold pass
per mount fills its worker's RAM tier, each round reads every file through every mount, in turn,
twice: warm (after `echo 3 > /proc/sys/vm/drop_caches`: data from the worker's cache) and second
epoch (page cache). Per pass: files/s, the mount process's CPU (utime + stime from
/proc/PID/stat) per 1,000 files, and FUSE requests per file from the mount's counters. Before
the mounts, `--micro N` times each checkout's op handlers in-process (no kernel, a Vfs that
answers at once): what the request path itself costs per call.

    git worktree add /tmp/before HEAD~1 && git worktree add /tmp/after HEAD
    python benchmarks/bench_fuse_path.py --variant before=/tmp/before \\
        --variant "after, readahead 128=/tmp/after:--read-ahead-kb 128" \\
        --variant after=/tmp/after

Each checkout runs from a package shim (symlinks: cachefs/ with fuse, master and worker mapped
in as the editable install does) on PYTHONPATH, so this repository's own install is not used.
Needs root (drop_caches).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_read import SHAPE  # noqa: E402
from benchmarks.dataset import make_dataset  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    drop_caches,
    file_reader,
    mount_pid,
    read_pass,
    scrape_fuse_ops,
)
from benchmarks.results import replace_section, rerun_command  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SECTION = "Lean FUSE request path (bench_fuse_path.py)"


@dataclasses.dataclass
class Variant:
    name: str
    checkout: Path
    flags: list[str]
    env: dict = dataclasses.field(default_factory=dict)
    mountpoint: Path | None = None
    pid: int = 0
    metrics: str = ""
    passes: dict = dataclasses.field(default_factory=dict)  # kind -> [(files/s, cpu µs, reqs)]
    micro: dict = dataclasses.field(default_factory=dict)  # op -> µs per call


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    checkout, _, flags = rest.partition(":")
    return Variant(name, Path(checkout).resolve(), shlex.split(flags))


def package_shim(checkout: Path, dest: Path) -> Path:
    """A dir for PYTHONPATH where `cachefs` (and cachefs.fuse/master/worker) is `checkout`'s."""
    pkg = dest / "cachefs"
    pkg.mkdir(parents=True)
    for entry in (checkout / "cachefs").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub in ("fuse", "master", "worker"):
        (pkg / sub).symlink_to(checkout / sub)
    return dest


# The ops themselves, without the kernel: CacheFsOperations over a Vfs that answers at once
# (read and lookup as if from the worker's and master's memory, with one checkpoint each).
MICRO = """
import time, sys, trio
from cachefs.fuse.operations import CacheFsOperations
from cachefs.meta import Attr

ATTR = Attr(5, 0, 48_000, 1, 1)
DATA = bytes(48_000)

class Vfs:
    root = Attr(2, 1, 0, 1, 1)
    async def lookup(self, parent, name):
        await trio.lowlevel.checkpoint()
        return ATTR
    async def getattr(self, ino):
        return ATTR
    async def open(self, ino, flags):
        return 1
    async def read(self, fh, off, size):
        await trio.lowlevel.checkpoint()
        return DATA
    def release(self, fh):
        pass

async def main(n):
    ops = CacheFsOperations(Vfs())
    calls = {"lookup": (ops.lookup, (1, b"f")), "getattr": (ops.getattr, (5,)),
             "open": (ops.open, (5, 0, None)), "read": (ops.read, (1, 0, 131072)),
             "release": (ops.release, (1,))}
    for name, (fn, args) in calls.items():
        best = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                await fn(*args)
            best.append((time.perf_counter() - t) / n * 1e6)
        print(name, min(best))

trio.run(main, int(sys.argv[1]))
"""


def micro(v: Variant, n: int) -> dict[str, float]:
    """µs per op call of the checkout's CacheFsOperations (best of 5 runs of n calls)."""
    out = subprocess.run([sys.executable, "-c", MICRO, str(n)], env=v.env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return {name: float(us) for name, us in (line.split() for line in out.splitlines())}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cachefs(v: Variant, *args: str, timeout: float = 300) -> None:
    cmd = [sys.executable, "-m", "cachefs.cli", *args]
    result = subprocess.run(cmd, env=v.env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{v.name}: {shlex.join(args)} failed: {result.stderr.strip()}")


def measure(v: Variant, kind: str, order, manifest, threads: int) -> None:
    ops_before = scrape_fuse_ops(v.metrics)
    cpu = cpu_seconds(v.pid)
    seconds, _ = read_pass(file_reader(v.mountpoint), order, manifest, threads)
    cpu = cpu_seconds(v.pid) - cpu
    ops = scrape_fuse_ops(v.metrics) - ops_before
    n = len(order)
    row = (n / seconds, cpu / n * 1e6, sum(ops.values()) / n, ops["read"] / n)
    v.passes.setdefault(kind, []).append(row)
    print(f"{v.name} {kind}: {row[0]:,.0f} files/s, mount CPU {row[1]:,.0f} µs/file, "
          f"{row[2]:.2f} requests/file ({row[3]:.2f} reads)", flush=True)  # fmt: skip


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def table(variants: list[Variant]) -> str:
    lines = [
        "| variant | pass | files/s median (range) | mount CPU µs per file median (range) "
        "| FUSE requests per file (reads) |",
        "|---|---|---:|---:|---:|",
    ]
    for kind, label in (("warm", "warm (drop_caches)"), ("epoch2", "second epoch")):
        for v in variants:
            rows = v.passes[kind]
            lines.append(
                f"| {v.name} | {label} | {spread([r[0] for r in rows], ',.0f')} "
                f"| {spread([r[1] for r in rows], ',.0f')} "
                f"| {statistics.median(r[2] for r in rows):.2f} "
                f"({statistics.median(r[3] for r in rows):.2f}) |"
            )
    if any(v.micro for v in variants):
        ops = list(next(v.micro for v in variants if v.micro))
        lines += ["", "| variant | " + " | ".join(f"{op} µs" for op in ops) + " |",
                  "|---|" + "---:|" * len(ops)]  # fmt: skip
        for v in variants:  # one row per checkout: flags do not change the op code
            if v.micro:
                lines.append(
                    f"| {v.name} | " + " | ".join(f"{v.micro[op]:.1f}" for op in ops) + " |"
                )
    return "\n".join(lines)


def run(args, variants: list[Variant], workdir: Path) -> dict:
    shape = dataclasses.replace(SHAPE, files=args.files, seed=args.seed)
    local = workdir / "local"
    manifest = make_dataset(local, shape)
    order = sorted(manifest)
    random.Random(args.seed + 1).shuffle(order)
    shm_before = set(Path("/dev/shm").glob("cachefs-*"))
    for i, v in enumerate(variants):
        v.env = {**os.environ, "PYTHONPATH": str(package_shim(v.checkout, workdir / f"py{i}"))}
        if args.micro and all(v.checkout != u.checkout for u in variants[:i]):
            v.micro = micro(v, args.micro)
            print(f"{v.name}: µs per op call {v.micro}", flush=True)
    try:
        for i, v in enumerate(variants):
            v.mountpoint = workdir / f"mnt{i}"
            v.mountpoint.mkdir()
            v.metrics = f"127.0.0.1:{free_port()}"
            cachefs(v, "mount", local.as_uri(), str(v.mountpoint), "--state",
                    str(workdir / f"state{i}"), "--mem", args.mem, "--metrics", v.metrics,
                    *v.flags)  # fmt: skip
            v.pid = mount_pid(v.mountpoint)
            read_pass(file_reader(v.mountpoint), order, manifest, args.threads)  # fills the cache
        for _ in range(args.rounds):
            for v in variants:
                drop_caches()
                measure(v, "warm", order, manifest, args.threads)
                measure(v, "epoch2", order, manifest, args.threads)
    finally:
        for v in variants:
            if v.mountpoint is not None and os.path.ismount(v.mountpoint):
                subprocess.run([sys.executable, "-m", "cachefs.cli", "umount", str(v.mountpoint)],
                               env=v.env, capture_output=True, timeout=60)  # fmt: skip
        for path in set(Path("/dev/shm").glob("cachefs-*")) - shm_before:
            shutil.rmtree(path, ignore_errors=True)
    return {"files": len(manifest), "bytes": sum(size for size, _ in manifest.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=CHECKOUT[:MOUNT FLAGS]")  # fmt: skip
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mem", default="1G")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--micro", type=int, default=20_000,
                        help="calls per op for the in-process op cost (0: skip)")  # fmt: skip
    parser.add_argument("--results", type=Path, help="update this results.md section")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: the warm passes drop the page cache")
    variants = [parse_variant(text) for text in args.variant]
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-fuse-"))
    started = time.perf_counter()
    try:
        info = run(args, variants, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(variants)
    print(text)
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    if args.results:
        command = rerun_command("benchmarks/bench_fuse_path.py")
        load = os.getloadavg()
        note = (
            f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with `{command}` "
            f"({elapsed:.0f} s; load average {load[0]:.1f} at the end). {info['files']:,} "
            f"files of bench_read.py's mix ({info['bytes'] / (1 << 20):,.0f} MiB) in a local "
            "directory, one embedded mount per variant, all mounted at once; after a cold pass "
            f"per mount, {args.rounds} rounds of a warm pass (drop_caches first; data from the "
            "worker's RAM tier) and a second-epoch pass (page cache) through each mount in "
            f"turn, {args.threads} reader threads, every file checked. Mount CPU = utime + "
            "stime of the mount process (master, worker and FUSE client) over the pass, from "
            "/proc/PID/stat; requests counted by the mount's `cachefs_fuse_ops_total`."
        )
        replace_section(args.results, SECTION, note + "\n\n" + text)


if __name__ == "__main__":
    main()
