"""How fast does a training reader get its files through a cachefs mount, next to the alternatives?

Makes a seeded rawframes-like dataset (directories of 10 frames, log-normal sizes with median
~48 KB, and one file in a hundred of a few MB, some above the 4 MiB block size), writes it to a
local temp dir (the "local disk" baseline) and uploads it to a moto S3 server on 127.0.0.1 (the
"remote store"). Then one reader — N threads taking files from one seeded shuffled order, each
file read whole and checked (size and xxh3_64 against the manifest made at generation) — reads
every file once per row, in this order:

  * local disk, cold: after `echo 3 > /proc/sys/vm/drop_caches`; then warm (page cache);
  * direct S3: pyarrow.fs.S3FileSystem on the same bucket (`open_input_stream(...).read()`,
    a HEAD and a GET per file, the same pyarrow calls a cachefs worker makes on a miss);
  * cachefs: `cachefs mount s3://bucket/prefix` in embedded mode (master, worker and FUSE
    client in one background process) with a fresh state dir: cold (empty cache, every file
    filled from S3 once), warm (drop_caches, then read: page cache and kernel dentries gone,
    data from the worker's MEM tier), second epoch (read again: kernel page cache, keep_cache).
    The worker's counters confirm it: cold = one remote read per file (per 4 MiB block),
    warm and second epoch = no remote read.

`--delay-ms D` puts an HTTP proxy (tests/store_proxy.py, a subprocess) between every S3 reader
and moto that holds each answer D ms, a crude stand-in for a remote store's first-byte
latency; without it "remote" is loopback-fast.

The dataset, the store, the proxy and the verified reader are shared with run_all.py
(benchmarks/dataset.py, benchmarks/harness.py, tests/store_proxy.py).

    python benchmarks/bench_read.py                 # ~3,000 files (needs root for drop_caches)
    python benchmarks/bench_read.py --quick         # ~1,000 files
    python benchmarks/bench_read.py --delay-ms 20   # emulate a slower remote store

Prints a Markdown table; `--results benchmarks/results.md` also replaces this benchmark's
section in that file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dataset import Shape, make_dataset  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    CpuMeter,
    drop_caches,
    embedded_worker_stats,
    file_reader,
    mount_pid,
    read_pass,
    s3_reader,
    start_store,
    stop,
    upload,
)
from benchmarks.harness import profiled as _profiled  # noqa: E402
from benchmarks.results import replace_section, rerun_command  # noqa: E402
from cachefs.worker.tier import BLOCK_SIZE  # noqa: E402
from tests.procs import run_cli  # noqa: E402
from tests.store_proxy import StoreProxy  # noqa: E402

MiB = 1 << 20
BUCKET, PREFIX = "bench-read", "rawframes"
#: this benchmark's size mix (run_all.py uses dataset.py's defaults): frames log-normal with
#: median ~48 KB, and one file in a hundred of a few MB (median 2.5 MB, capped at 6 MiB)
SHAPE = Shape(
    median=48_000, sigma=0.8, min_size=1,
    large_every=100, large_median=2_500_000, large_sigma=0.5, large_cap=6 * MiB,
)  # fmt: skip

# relative path -> (size, xxh3_64 of the content)
Manifest = dict[str, tuple[int, int]]


def remote_reads_needed(manifest: Manifest) -> int:
    """Remote reads that fill the cache: one per file, one per 4 MiB block of larger files."""
    return sum(1 if size <= BLOCK_SIZE else -(-size // BLOCK_SIZE) for size, _ in manifest.values())


@contextlib.contextmanager
def profiled(pid: int, out_dir: Path | None, label: str):
    """py-spy records the mount process while the block runs (see harness.profiled)."""
    if out_dir is None:
        yield
        return
    with _profiled({"mount": pid}, out_dir, f"cachefs-{label}") as paths:
        yield
    print(f"profile of the mount process: {paths['mount']}", flush=True)


def unmount(mountpoint: Path) -> None:
    if not os.path.ismount(mountpoint):
        return
    result = run_cli("umount", str(mountpoint), timeout=60)
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        print(f"umount failed ({result.stderr.strip()}); lazily unmounted", file=sys.stderr)


# --- the run ----------------------------------------------------------------------------------


def run(args, workdir: Path) -> tuple[list[dict], dict]:
    info: dict = {}
    moto = proxy = None
    mountpoint = workdir / "mnt"
    shm_dir: Path | None = None
    try:
        moto, server = start_store(workdir / "moto.log")
        endpoint = server.endpoint
        local = workdir / "local"
        t = time.perf_counter()
        shape = dataclasses.replace(SHAPE, files=args.files, seed=args.seed)
        manifest = make_dataset(local, shape)
        upload(server, BUCKET, PREFIX, local, manifest, args.threads)
        info["files"] = len(manifest)
        info["bytes"] = sum(size for size, _ in manifest.values())
        info["large"] = sum(1 for size, _ in manifest.values() if size > BLOCK_SIZE)
        print(
            f"dataset: {info['files']:,} files, {info['bytes'] / MiB:,.0f} MiB "
            f"({info['large']} above 4 MiB), written and uploaded in "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )
        if args.delay_ms:
            proxy = StoreProxy(endpoint, subprocess=True, delay=args.delay_ms / 1000)
            endpoint = proxy.endpoint
        order = sorted(manifest)
        random.Random(args.seed + 1).shuffle(order)

        rows: list[dict] = []

        def measure(name: str, read, meter: CpuMeter, *, drop: bool) -> dict:
            if drop:
                drop_caches()
            row = {"system": name, "cpu": {}}
            with meter.measure(row["cpu"]):
                row["seconds"], row["bytes"] = read_pass(read, order, manifest, args.threads)
            rows.append(row)
            print(
                f"{name}: {len(order) / row['seconds']:,.0f} files/s, "
                f"{row['bytes'] / MiB / row['seconds']:,.1f} MiB/s",
                flush=True,
            )
            return row

        meter = CpuMeter(moto=moto.pid, proxy=proxy.pid if proxy else None)
        measure("local disk, cold (drop_caches)", file_reader(local), meter, drop=True)
        measure("local disk, warm (page cache)", file_reader(local), meter, drop=False)
        measure("direct S3 (pyarrow)", s3_reader(endpoint, BUCKET, PREFIX), meter, drop=True)

        mountpoint.mkdir()
        drop_caches()
        t = time.perf_counter()
        result = run_cli(
            "mount", f"s3://{BUCKET}/{PREFIX}", str(mountpoint),
            "--state", str(workdir / "state"), "--mem", args.mem,
            "-o", f"endpoint_override={endpoint}", "-o", "scheme=http",
            timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"cachefs mount failed: {result.stderr.strip()}")
        info["mount_s"] = time.perf_counter() - t
        pid = mount_pid(mountpoint)
        info["mount_pid"] = pid
        print(f"mounted in {info['mount_s']:.1f} s (pid {pid}, metadata synced)", flush=True)
        before = embedded_worker_stats(pid)
        if before is not None:
            shm_dir = Path("/dev/shm") / f"cachefs-{before['worker_id']}"
            print(f"embedded worker {before['worker_id']}", flush=True)
        meter = CpuMeter(moto=moto.pid, proxy=proxy.pid if proxy else None, cachefs=pid)
        mounted = file_reader(mountpoint)
        counters = [before]
        for name, drop, label in (
            ("cachefs, cold (empty cache)", False, "cold"),
            ("cachefs, warm (worker cache, drop_caches)", True, "warm"),
            ("cachefs, second epoch (page cache)", False, "epoch2"),
        ):
            if drop:
                drop_caches()  # before the profiler starts
            with profiled(pid, args.profile, label):
                measure(name, mounted, meter, drop=False)
            counters.append(embedded_worker_stats(pid))
        if all(c is not None for c in counters):
            pairs = list(itertools.pairwise(counters))
            remote = [b["remote_reads"] - a["remote_reads"] for a, b in pairs]
            hits = [b["hits"] - a["hits"] for a, b in pairs]
            info["remote_reads"], info["hits"] = remote, hits
            needed = remote_reads_needed(manifest)
            if remote != [needed, 0, 0]:
                raise AssertionError(f"remote reads per pass {remote}, expected [{needed}, 0, 0]")
            print(f"worker: remote reads per pass {remote}, hits per pass {hits}", flush=True)
        return rows, info
    finally:
        unmount(mountpoint)
        if proxy is not None:
            proxy.stop()
        stop(moto)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)


def table(rows: list[dict]) -> str:
    by_name = {r["system"]: r for r in rows}
    local_cold = rows[0]
    direct = by_name.get("direct S3 (pyarrow)")
    lines = [
        "| system | files/s | MiB/s | × local disk (cold) | × direct S3 "
        "| CPU s: reader / moto / cachefs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        files_s = r["files"] / r["seconds"]
        mib_s = r["bytes"] / MiB / r["seconds"]
        vs_local = local_cold["seconds"] / r["seconds"]
        vs_direct = f"{direct['seconds'] / r['seconds']:.2f}" if direct else "–"
        cpu = " / ".join(
            f"{r['cpu'][k]:.1f}" if k in r["cpu"] else "–" for k in ("reader", "moto", "cachefs")
        )
        lines.append(
            f"| {r['system']} | {files_s:,.0f} | {mib_s:,.1f} | {vs_local:.2f} | {vs_direct} "
            f"| {cpu} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=None, help="dataset size (default 3000)")
    parser.add_argument("--quick", action="store_true", help="1,000 files")
    parser.add_argument("--threads", type=int, default=8, help="reader threads")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added per S3 request")
    parser.add_argument("--mem", default="1G", help="the embedded worker's MEM tier")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--results", type=Path, help="update this results.md section")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the mount process during each cachefs row into DIR (slows those rows)",
    )
    args = parser.parse_args()
    args.files = args.files or (1000 if args.quick else 3000)
    if os.geteuid() != 0:
        parser.error("needs root: the cold rows drop the page cache via /proc/sys/vm/drop_caches")

    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-read-", dir=args.workdir))
    started = time.perf_counter()
    try:
        rows, info = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for r in rows:
        r["files"] = info["files"]
    text = table(rows)
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.results:
        command = rerun_command("benchmarks/bench_read.py")
        cores = os.cpu_count()
        remote = (
            f"each S3 response held {args.delay_ms:g} ms by a proxy"
            if args.delay_ms
            else 'so the "remote" store is about loopback-fast (no --delay-ms)'
        )
        checked = (
            f" The worker's counters: remote reads per cachefs pass {info['remote_reads']} "
            f"(cold = one per file, one per 4 MiB block above that), MEM-tier hits "
            f"{info['hits']}."
            if "remote_reads" in info
            else ""
        )
        note = (
            f"Measured {time.strftime('%Y-%m-%d')} on {cores} cores with `{command}`: "
            f"{info['files']:,} rawframes-like files, {info['bytes'] / MiB:,.0f} MiB "
            f"({info['large']} above 4 MiB), read once per row by {args.threads} threads in one "
            "seeded shuffled order, every file checked (size + xxh3). moto runs on the same "
            f"machine, {remote}; the reader, moto and the cachefs mount process (embedded: "
            f"master, worker and FUSE client in one process) all share the {cores} cores. "
            "Cold rows follow `echo 3 > /proc/sys/vm/drop_caches`; direct S3 = pyarrow "
            "S3FileSystem `open_input_stream().read()` (HEAD + GET per file), the same calls "
            f"a worker makes on a miss. The mount (with its metadata sync) took "
            f"{info['mount_s']:.1f} s before the cold row.{checked} CPU columns: seconds of "
            "CPU used by each process during the row."
        )
        replace_section(args.results, "Read path (bench_read.py)", note + "\n\n" + text)


if __name__ == "__main__":
    main()
