"""Issue #13's acceptance: is cachefs's warm read path at kernel speed? Ratios side by side.

One run, one dataset (benchmarks/dataset.py, rawframes-like), these systems:
  * local disk: cold (page cache dropped) and warm (page cache), buffered and unbuffered;
  * the minimal pyfuse3 file system (benchmarks/minimal_fs.py: the tree in RAM, no cache
    logic): the floor a Python FUSE server reaches here;
  * cachefs embedded (`cachefs mount file://DATA`, a cold pass fills its RAM tier first);
  * cachefs cluster, worker on this host (master + worker processes, `cachefs load`, then
    `cachefs mount DATASET --master` and a first pass through it: names from the master).
Per round and FUSE system: "warm" = page cache dropped, buffered readers, then again with
unbuffered ones (the data comes from the worker's RAM tier in /dev/shm, which drop_caches does
not drop; for the minimal FS, from its dicts); "second epoch" = page cache kept, buffered then
unbuffered. Each pass: N threads, one
seeded shuffled order, every file checked (size + xxh3). FUSE requests per file come from the
kernel tracepoint fuse:fuse_request_send. Then DataLoader epochs (benchmarks/torch_epoch.py)
per system with the page cache dropped: buffered readers, then unbuffered ones.

    python benchmarks/bench_warm.py                          # 20,000 files, 3 rounds
    python benchmarks/bench_warm.py --files 1500 --rounds 1 --no-torch    # smoke run
    python benchmarks/bench_warm.py --results benchmarks/results.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dataset import add_shape_arguments, describe, ensure_dataset, shape_from  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    FuseRequestTrace,
    dataloader_epoch,
    drop_caches,
    embedded_worker_stats,
    file_reader,
    fuse_unmount,
    git_state,
    machine,
    mount_pid,
    process_cpu_seconds,
    read_pass,
    stop,
    unbuffered_file_reader,
    wait_for_mount,
    worker_stats_at,
)
from benchmarks.results import replace_section  # noqa: E402
from tests.procs import master_process, run_cli, stop_services, worker_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TITLE = "Warm read path (#13)"
MiB = 1 << 20
SYSTEMS = {
    "local": "local disk",
    "minimal": "minimal pyfuse3 FS",
    "embedded": "cachefs embedded",
    "cluster": "cachefs cluster (worker on this host)",
}
FUSE_SYSTEMS = ["minimal", "embedded", "cluster"]
CACHEFS_SYSTEMS = ["embedded", "cluster"]
# (pass key, column title); local disk's "warm" is its cold pass, its epochs are page cache
PASSES = {
    "warm": "warm (page cache dropped), buffered",
    "warm_raw": "warm (page cache dropped), unbuffered",
    "epoch2": "second epoch (page cache), buffered",
    "epoch2_raw": "second epoch (page cache), unbuffered",
}
PASS_SHORT = {
    "warm": "warm",
    "warm_raw": "warm unbuffered",
    "epoch2": "epoch 2",
    "epoch2_raw": "epoch 2 unbuffered",
}
LOCAL_PASSES = {
    "warm": "cold",
    "warm_raw": "cold, unbuffered",
    "epoch2": "warm",
    "epoch2_raw": "warm, unbuffered",
}


def cli(*args: str, timeout: float = 900) -> str:
    result = run_cli(*args, timeout=timeout, env={"CACHEFS_LOG_LEVEL": "INFO"})
    if result.returncode:
        raise RuntimeError(f"cachefs {' '.join(args)}: {result.stderr.strip()[-800:]}")
    return result.stdout


def dataloader_seconds(
    root: Path, manifest_path: Path, args: argparse.Namespace, unbuffered: bool
) -> float:
    out = dataloader_epoch(
        root, manifest_path, args.loader_workers, args.batch, args.seed + 2, unbuffered
    )
    return out["seconds"]


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """median [min–max]; the range only when there is more than one value."""
    median = format(statistics.median(values), fmt)
    if len(values) < 2:
        return median
    return f"{median} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def ratios(numerators: list[float], denominators: list[float]) -> str:
    """Per-round ratios (each round's passes ran back to back): median [min–max]."""
    return spread([n / d for n, d in zip(numerators, denominators, strict=True)], ".2f")


def requests_cell(per_round: list[Counter], files: int) -> str:
    if not per_round:
        return "–"
    total = spread([sum(c.values()) / files for c in per_round], ".2f")
    ops = sorted(set().union(*per_round), key=lambda op: -sum(c[op] for c in per_round))
    by_op = ", ".join(
        f"{op} {statistics.median(c[op] for c in per_round) / files:.2f}" for op in ops
    )
    return f"{total} ({by_op})" if by_op else total


class Run:
    """The mounts and processes of one benchmark run; close() takes all of them down."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.cachefs_args = shlex.split(args.cachefs_args)
        self.mounts: dict[str, Path] = {}
        self.minimal_proc: subprocess.Popen | None = None
        self.master = self.worker = None
        self.worker_ids: dict[str, str] = {}
        self.shm_before = set(Path("/dev/shm").glob("cachefs-*"))
        self.notes: list[str] = []

    def start_minimal(self, source: Path) -> None:
        mountpoint = self.workdir / "mnt-minimal"
        mountpoint.mkdir()
        log = self.workdir / "minimal_fs.log"
        with open(log, "w") as out:
            self.minimal_proc = subprocess.Popen(
                [sys.executable, str(REPO / "benchmarks" / "minimal_fs.py"), str(source),
                 str(mountpoint)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.mounts["minimal"] = mountpoint
        wait_for_mount(mountpoint, self.minimal_proc, 600, log)  # loads the tree into RAM first

    def start_embedded(self, source: Path) -> None:
        mountpoint = self.workdir / "mnt-embedded"
        mountpoint.mkdir()
        cli("mount", source.as_uri(), str(mountpoint), "--state", str(self.workdir / "state"),
            "--mem", self.args.mem, *self.cachefs_args)  # fmt: skip
        self.mounts["embedded"] = mountpoint
        stats = embedded_worker_stats(mount_pid(mountpoint))
        if stats is not None:
            self.worker_ids["embedded"] = stats["worker_id"]

    def start_cluster(self, source: Path) -> str:
        self.master = master_process(self.workdir)
        self.master.start()
        # the RAM tier in /dev/shm as in production (tests.procs puts it under workdir)
        self.worker = worker_process(
            self.workdir, self.master.address, "w1", self.args.mem, "--shm", "/dev/shm"
        )
        self.worker.start()
        self.worker_ids["cluster"] = self.cluster_stats()["worker_id"]
        secret = ["--master", self.master.address, "--secret-file", str(self.secret_file)]
        cli("dataset", "add", "bench", source.as_uri(), *secret)
        loaded = cli("load", "bench", *secret).strip().splitlines()[-1]
        mountpoint = self.workdir / "mnt-cluster"
        mountpoint.mkdir()
        cli("mount", "bench", str(mountpoint), *secret, *self.cachefs_args)
        self.mounts["cluster"] = mountpoint
        return loaded

    @property
    def secret_file(self) -> Path:
        return self.workdir / "master-state" / "secret"  # where the master created it

    def cluster_stats(self) -> dict:
        return worker_stats_at([self.worker.address], self.master.secret)

    def serving_pid(self, system: str) -> int | None:
        """The process that serves `system`'s mount (None: local disk). With --procs > 1 its
        helpers serve too; their CPU is not counted."""
        if system == "minimal":
            return self.minimal_proc.pid
        return mount_pid(self.mounts[system]) if system in CACHEFS_SYSTEMS else None

    def remote_reads(self, system: str) -> int | None:
        """The worker's reads from the source so far (a warm pass must make none)."""
        if system == "cluster":
            return self.cluster_stats()["remote_reads"]
        if system == "embedded":
            stats = embedded_worker_stats(mount_pid(self.mounts["embedded"]))
            return stats["remote_reads"] if stats else None
        return None

    def close(self) -> None:
        for system in CACHEFS_SYSTEMS:
            mountpoint = self.mounts.get(system)
            if mountpoint is not None and os.path.ismount(mountpoint):
                result = run_cli("umount", str(mountpoint))
                if result.returncode:
                    self.notes.append(f"cachefs umount {system}: {result.stderr.strip()[-300:]}")
        stop(self.minimal_proc)  # SIGTERM: it unmounts itself
        for mountpoint in self.mounts.values():
            fuse_unmount(mountpoint)  # whatever did not go cleanly
        stop_services(self.worker, self.master)
        # only the RAM tiers of this run's workers: others may belong to concurrent tests
        for worker_id in self.worker_ids.values():
            shutil.rmtree(Path("/dev/shm") / f"cachefs-{worker_id}", ignore_errors=True)
        left = set(Path("/dev/shm").glob("cachefs-*")) - self.shm_before
        if left:
            self.notes.append(f"new /dev/shm dirs not of this run, left alone: {sorted(left)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, files=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--mem", default="3G", help="each cachefs worker's RAM tier")
    parser.add_argument(
        "--cachefs-args", default="", help="appended to both `cachefs mount` commands"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the DataLoader epochs")
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, help="keep/reuse the generated dataset here")
    parser.add_argument("--results", type=Path, help="update this results.md section")
    args = parser.parse_args()

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-warm-"))
    data_dir = args.data_dir or workdir / "dataset"
    shape = shape_from(args, args.files)
    run = Run(args, workdir)
    trace = FuseRequestTrace(f"cachefs-bench-warm-{os.getpid()}")
    rates: dict[tuple[str, str], list[float]] = {}
    requests: dict[tuple[str, str], list[Counter]] = {}
    epochs: dict[tuple[str, bool], list[float]] = {}
    cpu: dict[tuple[str, bool], list[float]] = {}  # the serving process's CPU µs per file
    setup: list[str] = []
    try:
        source, manifest = ensure_dataset(data_dir, shape)
        info = describe(manifest)
        print(f"{info['files']:,} files, {info['bytes'] / MiB:,.0f} MiB", flush=True)
        order = sorted(manifest)
        random.Random(args.seed).shuffle(order)

        def measure(system: str, pass_key: str, read: Callable[[str], bytes], root: Path | None):
            if root is not None:
                trace.start(root)
            seconds, _ = read_pass(read, order, manifest, args.threads)
            counted = trace.stop() if root is not None else None
            rates.setdefault((system, pass_key), []).append(len(order) / seconds)
            if counted is not None:
                requests.setdefault((system, pass_key), []).append(counted)
            line = f"  {system} {pass_key}: {len(order) / seconds:,.0f} files/s"
            if counted is not None:
                line += f", {sum(counted.values()) / len(order):.2f} FUSE requests/file"
            print(line, flush=True)

        t = time.perf_counter()
        run.start_minimal(source)
        setup.append(f"minimal FS loaded and mounted in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        run.start_embedded(source)
        mounted = time.perf_counter() - t
        drop_caches()
        seconds, _ = read_pass(file_reader(run.mounts["embedded"]), order, manifest, args.threads)
        setup.append(
            f"cachefs embedded mounted in {mounted:.1f} s, then a cold pass (fills its RAM "
            f"tier) at {len(order) / seconds:,.0f} files/s"
        )
        loaded = run.start_cluster(source)
        # A fresh mount asks the master for every name once (its first epoch); the rounds
        # measure it afterwards, as the embedded mount's after its cold pass.
        drop_caches()
        seconds, _ = read_pass(file_reader(run.mounts["cluster"]), order, manifest, args.threads)
        setup.append(
            f"cachefs cluster: `cachefs load`: {loaded}; then a first pass through the fresh "
            f"mount (names from the master, data from the worker) at "
            f"{len(order) / seconds:,.0f} files/s"
        )

        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}", flush=True)
            drop_caches()
            measure("local", "warm", file_reader(source), None)
            measure("local", "epoch2", file_reader(source), None)
            measure("local", "epoch2_raw", unbuffered_file_reader(source), None)
            drop_caches()
            measure("local", "warm_raw", unbuffered_file_reader(source), None)
            for system in FUSE_SYSTEMS:
                root = run.mounts[system]
                before = run.remote_reads(system)
                drop_caches()
                measure(system, "warm", file_reader(root), root)
                measure(system, "epoch2", file_reader(root), root)
                measure(system, "epoch2_raw", unbuffered_file_reader(root), root)
                drop_caches()
                measure(system, "warm_raw", unbuffered_file_reader(root), root)
                after = run.remote_reads(system)
                if before is not None and after is not None and after != before:
                    raise AssertionError(f"{system}: {after - before} source reads in warm passes")
            if not args.no_torch:
                for system, unbuffered in itertools.product(SYSTEMS, (False, True)):
                    root = source if system == "local" else run.mounts[system]
                    pid = run.serving_pid(system)
                    drop_caches()
                    used = process_cpu_seconds(pid) if pid else 0.0
                    seconds = dataloader_seconds(root, data_dir / "manifest.json", args, unbuffered)
                    epochs.setdefault((system, unbuffered), []).append(seconds)
                    if pid:
                        used = process_cpu_seconds(pid) - used
                        cpu.setdefault((system, unbuffered), []).append(used / len(order) * 1e6)
                    reader = "unbuffered" if unbuffered else "buffered"
                    print(f"  {system} DataLoader epoch, {reader}: {seconds:.2f} s", flush=True)
    finally:
        run.close()
        trace.close()
        shutil.rmtree(workdir, ignore_errors=True)
        for note in run.notes:
            print(f"cleanup: {note}", file=sys.stderr)

    text = report(args, info, setup, rates, requests, epochs, cpu, trace.unavailable, started)
    print(text)
    if args.results:
        replace_section(args.results, TITLE, text)


def report(args, info, setup, rates, requests, epochs, cpu, trace_unavailable, started) -> str:
    files = info["files"]
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    command = ["python", "benchmarks/bench_warm.py", "--files", str(args.files), "--rounds",
               str(args.rounds), "--threads", str(args.threads)]  # fmt: skip
    if args.cachefs_args:
        command += ["--cachefs-args", args.cachefs_args]
    if args.no_torch:
        command.append("--no-torch")
    mount_flags = f"`{args.cachefs_args}` appended" if args.cachefs_args else "their defaults"
    out = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{shlex.join(command)}` "
        f"({time.perf_counter() - started:.0f} s), {git_state(REPO)}. Machine: {machine()}.",
        "",
        f"Dataset: {files:,} rawframes-like files in {info['dirs']:,} directories, "
        f"{info['bytes'] / MiB:,.0f} MiB (median {info['median'] / 1000:.0f} KB, up to "
        f"{info['max'] / MiB:.1f} MiB, {info['above_4mib']} above 4 MiB). Every pass: "
        f"{args.threads} threads, one seeded shuffled order, every file checked (size + xxh3). "
        f"Warm = page cache dropped before the pass: the FUSE systems then serve from RAM that "
        f"drop_caches does not drop (the cachefs workers' RAM tier in /dev/shm, the minimal "
        f"FS's dicts). Second epoch = page cache kept from the pass before. cachefs mounts "
        f"with {mount_flags} (default `--procs`: half the cores, 1 to 4); readahead 1024 KiB "
        f"on all three mounts; "
        f"cachefs workers' RAM tier {args.mem}. Median [min–max] over {rounds}; ratios are "
        f"per round. Setup: {'; '.join(setup)}.",
        "",
        "**Files/s**",
        "",
        "| system | " + " | ".join(PASSES.values()) + " |",
        "|---|" + "---:|" * len(PASSES),
    ]
    for system, label in SYSTEMS.items():
        cells = []
        for key in PASSES:
            cell = spread(rates[(system, key)])
            cells.append(f"{LOCAL_PASSES[key]}: {cell}" if system == "local" else cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    out += [
        "",
        "**Ratios** (files/s over files/s; > 1 is faster). Each pass vs local disk with the "
        "same reader and page cache state; the cachefs mounts vs the minimal FS in the same "
        "pass.",
        "",
        "| system | "
        + " | ".join(f"{PASS_SHORT[k]} / local {LOCAL_PASSES[k]}" for k in PASSES)
        + " | "
        + " | ".join(f"{PASS_SHORT[k]} / minimal FS" for k in PASSES)
        + " |",
        "|---|" + "---:|" * (2 * len(PASSES)),
    ]
    for system in FUSE_SYSTEMS:
        vs_local = [ratios(rates[(system, key)], rates[("local", key)]) for key in PASSES]
        vs_minimal = [
            "–" if system == "minimal" else ratios(rates[(system, key)], rates[("minimal", key)])
            for key in PASSES
        ]
        out.append(f"| {SYSTEMS[system]} | " + " | ".join(vs_local + vs_minimal) + " |")

    out += ["", "**FUSE requests per file** (tracepoint fuse:fuse_request_send, by opcode)", ""]
    if trace_unavailable:
        out.append(f"Not measured: {trace_unavailable}.")
    else:
        out += [
            "| system | " + " | ".join(PASSES.values()) + " |",
            "|---|" + "---|" * len(PASSES),
        ]
        for system in FUSE_SYSTEMS:
            cells = [requests_cell(requests.get((system, key), []), files) for key in PASSES]
            out.append(f"| {SYSTEMS[system]} | " + " | ".join(cells) + " |")
        out.append(
            "\nThe trace is on during the timed FUSE passes (filtered in the kernel to the one "
            "mount under test): a tracepoint's cost per request, small next to a FUSE round trip."
        )

    out += ["", "**DataLoader epoch**, page cache dropped (torch_epoch.py, "
            f"num_workers {args.loader_workers}, batch {args.batch})", ""]  # fmt: skip
    if not epochs:
        out.append("Not run (--no-torch).")
    else:
        out += [
            "| system | seconds, buffered reads | time / local disk | serving CPU µs/file "
            "| seconds, unbuffered reads | time / local disk, unbuffered | serving CPU µs/file |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for system in SYSTEMS:
            state = "cold" if system == "local" else "warm"
            cells = []
            for unbuffered in (False, True):
                mine, local = epochs[(system, unbuffered)], epochs[("local", unbuffered)]
                used = cpu.get((system, unbuffered))
                cells += [
                    spread(mine, ".2f"),
                    ratios(mine, local),
                    spread(used, ".0f") if used else "–",
                ]
            out.append(f"| {SYSTEMS[system]}, {state} | " + " | ".join(cells) + " |")
        out.append(
            "\nBuffered: `open(path, 'rb')` as most Datasets do (one more request per file: "
            "the isatty IOCTL of Python's buffered open); unbuffered: `buffering=0` "
            "(docs/performance.md). Serving CPU: user + system CPU time of the process that "
            "serves the mount during the epoch, per file; the loader's own "
            "processes share the same 2 cores."
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
