"""What do short-circuit reads buy a cluster mount whose worker runs on the same host?

One master and one worker process (its MEM tier in /dev/shm, as in production) on this machine,
a rawframes-like dataset (bench_read.py's size mix) added as a `file://` dataset and loaded
with `cachefs load`. Two cluster mounts of it side by side: one as shipped (short-circuit: the
client reads the worker's tier file through its lmdb index) and one started with
`CACHEFS_SHORTCIRCUIT=0` (every read a TCP RPC to the worker). Each round reads every file
once through local disk, then each mount, in one seeded shuffled order with N threads, every
file checked (size + xxh3); the page cache is dropped before every pass, so the mounts are
"warm" (worker cache) and local disk is "cold". The worker's cache-hit counter shows which
path served each pass.

    python benchmarks/bench_shortcircuit.py                      # 10,000 files, 3 rounds
    python benchmarks/bench_shortcircuit.py --results benchmarks/results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_read import SHAPE  # noqa: E402
from benchmarks.dataset import make_dataset  # noqa: E402
from benchmarks.harness import drop_caches, file_reader, read_pass, worker_stats_at  # noqa: E402
from benchmarks.results import replace_section  # noqa: E402
from cachefs.fuse.mount import pid_file  # noqa: E402
from tests.procs import master_process, run_cli, stop_services, worker_process  # noqa: E402

MiB = 1 << 20
TITLE = "Short-circuit reads, worker on the same host (bench_shortcircuit.py)"


def cli(master, *args: str, env: dict | None = None) -> str:
    result = run_cli(*args, "--master", master.address, timeout=900, env=env)
    if result.returncode:
        raise RuntimeError(f"cachefs {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def mount(master, mountpoint: Path, env: dict) -> None:
    mountpoint.mkdir()
    cli(master, "mount", "bench", str(mountpoint), env={"CACHEFS_LOG_LEVEL": "INFO", **env})


def sc_counters(mountpoint: Path) -> str:
    text = pid_file(mountpoint).with_suffix(".log").read_text(errors="replace")
    found = re.findall(r"short-circuit reads: (\{.*\})", text)
    return found[-1] if found else "(none logged)"


def fmt_rate(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--mem", default="2G", help="the worker's MEM tier")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, help="update this results.md section")
    args = parser.parse_args()

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-sc-"))
    shm = Path(tempfile.mkdtemp(prefix="cachefs-bench-sc-", dir="/dev/shm"))
    master = worker = None
    mounts: dict[str, Path] = {}
    rates: dict[str, list[float]] = {"local": [], "sc": [], "rpc": []}
    mib: dict[str, list[float]] = {"local": [], "sc": [], "rpc": []}
    hits: dict[str, list[int]] = {"sc": [], "rpc": []}
    try:
        shape = dataclasses.replace(SHAPE, files=args.files, seed=args.seed)
        source = workdir / "src"
        manifest = make_dataset(source, shape)
        total = sum(size for size, _ in manifest.values())
        print(f"{len(manifest):,} files, {total / MiB:,.0f} MiB", flush=True)
        master = master_process(workdir)
        master.start()
        worker = worker_process(workdir, master.address, "w1", args.mem, "--shm", str(shm))
        worker.start()
        cli(master, "dataset", "add", "bench", source.as_uri())
        print(cli(master, "load", "bench").strip().splitlines()[-1], flush=True)
        mounts["sc"] = workdir / "mnt-sc"
        mounts["rpc"] = workdir / "mnt-rpc"
        mount(master, mounts["sc"], {})
        mount(master, mounts["rpc"], {"CACHEFS_SHORTCIRCUIT": "0"})

        order = sorted(manifest)
        random.Random(args.seed).shuffle(order)
        readers = {"local": file_reader(source)} | {k: file_reader(p) for k, p in mounts.items()}
        for round_no in range(args.rounds):
            for name, read in readers.items():
                before = worker_stats_at([worker.address], master.secret)["hits"]
                drop_caches()
                seconds, nbytes = read_pass(read, order, manifest, args.threads)
                after = worker_stats_at([worker.address], master.secret)["hits"]
                rates[name].append(len(order) / seconds)
                mib[name].append(nbytes / MiB / seconds)
                if name in hits:
                    hits[name].append(after - before)
                print(f"round {round_no + 1} {name}: {len(order) / seconds:,.0f} files/s, "
                      f"worker cache reads {after - before}", flush=True)  # fmt: skip
    finally:
        for mountpoint in mounts.values():
            if os.path.ismount(mountpoint):
                run_cli("umount", str(mountpoint))
        counters = sc_counters(mounts["sc"]) if "sc" in mounts else ""
        stop_services(worker, master)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    local = statistics.median(rates["local"])
    labels = {
        "local": "local disk, page cache dropped",
        "sc": "cachefs cluster mount, short-circuit (default)",
        "rpc": "cachefs cluster mount, `CACHEFS_SHORTCIRCUIT=0` (RPC)",
    }
    lines = [
        "| reader | files/s median (range) | MiB/s median | × local disk "
        "| worker cache reads / pass |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in labels.items():
        reads = ", ".join(map(str, hits[name])) if name in hits else "–"
        lines.append(
            f"| {label} | {fmt_rate(rates[name])} | {statistics.median(mib[name]):,.1f} "
            f"| {statistics.median(rates[name]) / local:.2f} | {reads} |"
        )
    speedup = statistics.median(rates["sc"]) / statistics.median(rates["rpc"])
    lines.append(f"\nShort-circuit / RPC (medians): {speedup:.2f}×.")
    large = sum(1 for size, _ in manifest.values() if size > 4 * MiB)
    text = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with "
        f"`python benchmarks/bench_shortcircuit.py --files {args.files} --rounds {args.rounds}` "
        f"({time.perf_counter() - started:.0f} s): {len(manifest):,} rawframes-like files, "
        f"{total / MiB:,.0f} MiB ({large} above 4 MiB), bench_read.py's size mix; one master "
        f"and one worker process (MEM tier {args.mem} in /dev/shm) on this machine, loaded "
        f"with `cachefs load`; two cluster mounts side by side. {args.threads} reader threads, "
        f"one seeded shuffled order, every file checked (size + xxh3); page cache dropped "
        f"before every pass; {args.rounds} rounds of (local, short-circuit, RPC). Median "
        f"(min–max) over the rounds; the ratio is of the medians. The short-circuit mount "
        f"logged at unmount: {counters}.\n\n" + "\n".join(lines)
    )
    print(text)
    if args.results:
        replace_section(args.results, TITLE, text)


if __name__ == "__main__":
    main()
