"""How fast is the master's metadata path, and how much memory does a big namespace cost?

For each size (default 100k and 1M entries) it builds a synthetic local tree of empty sparse
files (directories of 10 "frames", like rawframes), starts a real `cachefs master` process,
and measures over real RPC on loopback (authenticated with the secret the master creates in its
state dir, as any client of a cluster is):

  * sync time of the whole tree (`dataset add` = first sync) and of an unchanged re-sync;
  * lookups/s with single `lookup` calls (C concurrent callers over one connection) and with
    batched `lookup_many` (100 names per call);
  * the master's RSS and USS (private memory: RSS minus shared lmdb file pages) after each step.

    python benchmarks/bench_metadata.py                 # 100k and 1M entries
    python benchmarks/bench_metadata.py --sizes 20000   # quick

Prints a Markdown table; `--results benchmarks/results.md` also replaces this benchmark's
section in that file.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import replace_section  # noqa: E402
from cachefs.config import parse_address  # noqa: E402
from cachefs.meta import Attr  # noqa: E402
from cachefs.rpc import RpcClient  # noqa: E402
from tests.procs import master_process, run_cli  # noqa: E402

FILES_PER_DIR = 10


def build_tree(root: Path, entries: int) -> list[tuple[str, str]]:
    """Creates ~`entries` files (sparse, log-normal sizes) in dirs of 10; returns (dir, name)."""
    rng = random.Random(7)
    names = []
    for d in range(entries // FILES_PER_DIR):
        dirname = f"class_{d // 1000:04d}/video_{d:07d}"
        path = root / dirname
        path.mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            name = f"img_{f:05d}.jpg"
            fd = os.open(path / name, os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(fd, int(rng.lognormvariate(10.8, 0.8)))  # median ~48 KB, no data written
            os.close(fd)
            names.append((dirname, name))
    return names


def memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


async def lookup_rates(address, secret, names, *, calls: int, concurrency: int, batch: int) -> dict:
    async with RpcClient(address, secret=secret, pool_size=1) as client:
        rng = random.Random(1)
        sample = [names[rng.randrange(len(names))] for _ in range(calls * batch)]
        # Resolve the sampled names' directories first (untimed), as a FUSE client's cache
        # would have them.
        parents: dict[str, int] = {}
        todo = sorted({d for d, _ in sample})

        async def resolve(chunk):
            for dirname in chunk:
                wire = await client.call("lookup_path", dataset="bench", path=dirname)
                parents[dirname] = Attr.from_wire(wire).ino

        async with trio.open_nursery() as nursery:
            for c in range(64):
                nursery.start_soon(resolve, todo[c::64])
        sample = [(parents[d], n) for d, n in sample]

        async def single(chunk):
            for parent, name in chunk:
                await client.call("lookup", dataset="bench", parent=parent, name=name)

        async def batched(chunk):
            for i in range(0, len(chunk), batch):
                found = await client.call(
                    "lookup_many", dataset="bench", items=chunk[i : i + batch]
                )
                assert all(found)

        worker = single if batch == 1 else batched
        per = len(sample) // concurrency
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for c in range(concurrency):
                nursery.start_soon(worker, sample[c * per : (c + 1) * per])
        elapsed = time.perf_counter() - started
        return {"lookups": per * concurrency, "seconds": elapsed}


def run_size(entries: int, workdir: Path) -> dict:
    tree = workdir / f"tree-{entries}"
    started = time.perf_counter()
    names = build_tree(tree, entries)
    build_s = time.perf_counter() - started
    master = master_process(workdir / f"master-{entries}")
    (workdir / f"master-{entries}").mkdir()
    master.start()
    try:
        pid = master.proc.pid
        row = {"entries": len(names), "build_s": build_s}
        row["rss_idle"], row["uss_idle"] = memory(pid)
        started = time.perf_counter()
        result = run_cli(
            "dataset", "add", "bench", tree.as_uri(), "--master", master.address, timeout=3600
        )
        assert result.returncode == 0, result.stderr
        row["sync_s"] = time.perf_counter() - started
        row["rss_sync"], row["uss_sync"] = memory(pid)
        started = time.perf_counter()
        result = run_cli("dataset", "sync", "bench", "--master", master.address, timeout=3600)
        assert result.returncode == 0 and "changed 0, removed 0" in result.stdout, result
        row["resync_s"] = time.perf_counter() - started

        address, secret = parse_address(master.address), master.secret
        single = trio.run(
            lambda: lookup_rates(address, secret, names, calls=40_000, concurrency=512, batch=1)
        )
        row["lookup_single_per_s"] = single["lookups"] / single["seconds"]
        many = trio.run(
            lambda: lookup_rates(address, secret, names, calls=1_000, concurrency=8, batch=100)
        )
        row["lookup_batched_per_s"] = many["lookups"] / many["seconds"]
        row["rss_end"], row["uss_end"] = memory(pid)
        return row
    finally:
        master.stop()
        shutil.rmtree(tree, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| entries | sync (s) | re-sync (s) | lookups/s single (512 callers, 1 conn) "
        "| lookups/s batched (100/call) | master RSS MiB after sync / end | USS MiB end |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['entries']:,} | {r['sync_s']:.1f} | {r['resync_s']:.1f} "
            f"| {r['lookup_single_per_s']:,.0f} | {r['lookup_batched_per_s']:,.0f} "
            f"| {r['rss_sync']:.0f} / {r['rss_end']:.0f} | {r['uss_end']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--results", type=Path, help="update this results.md section")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-meta-", dir=args.workdir))
    try:
        rows = []
        for size in args.sizes:
            rows.append(run_size(size, workdir))
            print(table(rows[-1:]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(rows)
    print(text)
    if args.results:
        note = (
            f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with "
            f"`python benchmarks/bench_metadata.py --sizes {' '.join(map(str, args.sizes))}`. "
            "Synthetic tree of sparse files in directories of 10; master and the load "
            "generator share the machine's cores."
        )
        replace_section(args.results, "Metadata (bench_metadata.py)", note + "\n\n" + text)


if __name__ == "__main__":
    main()
