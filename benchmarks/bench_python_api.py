"""The Python API (#16), side by side in one run: DataLoader epochs over cachefs.torch's Dataset.

    python benchmarks/bench_python_api.py [--files 10000] [--cold-files 3000] [--rounds 3]
        [--store moto|s3rver] [--results benchmarks/results.md]

Every epoch is benchmarks/torch_epoch.py in its own process: a DataLoader (--workers worker
processes, forked; batches of --batch; one seeded shuffle per round), every file's bytes
checked against the manifest. cachefs runs as a master and 2 workers on this host.

- Warm: the dataset (benchmarks/dataset.py, local disk) added as file://, `cachefs load`ed;
  per round: local files with the page cache dropped (the goal's reference), the API
  (CachefsDataset, short-circuit reads of the workers' RAM tiers, which live in /dev/shm and
  are not dropped by drop_caches), and the cluster FUSE mount (unbuffered reads) for reference.
- Cold: the same files in S3 (moto, or s3rver) behind tests/store_proxy.py adding --latency-ms
  to every answer; per round, the cache emptied before each of: an epoch of --cold-files
  files without a hint, and the same epoch with EpochPrefetchSampler (--window files in flight).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cold import BUCKET, PREFIX, put_all, start_s3rver  # noqa: E402
from benchmarks.dataset import Shape, describe, ensure_dataset  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    dataloader_epoch,
    drop_caches,
    machine,
    start_store,
    stop,
    upload,
)
from benchmarks.results import median_range, replace_section, rerun_command  # noqa: E402
from tests.procs import master_process, run_cli, worker_process  # noqa: E402
from tests.store_proxy import StoreProxy  # noqa: E402

EPOCH = Path(__file__).with_name("torch_epoch.py")


def api_epoch(master: str, name: str, manifest: Path, args, seed: int, **extra) -> dict:
    argv = [sys.executable, str(EPOCH), name, str(manifest), "--cachefs", master,
            "--workers", str(args.workers), "--batch", str(args.batch), "--seed", str(seed)]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"epoch over {name} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def span(values: list[float]) -> str:
    return median_range(values, ".2f")


def run(args, work: Path) -> str:
    data, manifest = ensure_dataset(args.data, Shape(files=args.files))
    manifest_path = args.data / "manifest.json"
    master = master_process(work)
    workers = [worker_process(work, "127.0.0.1:0", f"w{i}", args.worker_mem) for i in (1, 2)]
    store_proc = proxy = None
    mnt = work / "mnt"
    warm: dict[str, list[float]] = {"local": [], "api": [], "fuse": []}
    cold: dict[str, list[float]] = {"plain": [], "hint": []}

    def cli(*argv: str) -> None:
        done = run_cli(*argv, "--master", master.address, timeout=3600)
        assert done.returncode == 0, (argv, done.stderr)

    try:
        # The store first: its credentials go into this process's environment, which the
        # master and workers inherit (without any, the S3 client would look for a cloud's).
        if args.store == "s3rver":
            store_proc, endpoint = start_s3rver(work)
            put_all(endpoint, data, manifest)
        else:
            store_proc, server = start_store(work / "moto.log")
            endpoint = server.endpoint
            upload(server, BUCKET, PREFIX, data, manifest, threads=16)
        master.start()
        for w in workers:
            w.args[w.args.index("--master") + 1] = master.address
            w.start()
        cli("dataset", "add", "local", f"file://{data}")
        cli("load", "local")
        mnt.mkdir()
        cli("mount", "local", str(mnt))
        for r in range(args.rounds):
            drop_caches()
            warm["local"].append(dataloader_epoch(data, manifest_path, args.workers, args.batch,
                                                  seed=r)["seconds"])  # fmt: skip
            api = api_epoch(master.address, "local", manifest_path, args, r)
            warm["api"].append(api["seconds"])
            warm["fuse"].append(dataloader_epoch(mnt, manifest_path, args.workers, args.batch,
                                                 seed=r, unbuffered=True)["seconds"])  # fmt: skip
            print({k: v[-1] for k, v in warm.items()}, flush=True)
        run_cli("umount", str(mnt))

        proxy = StoreProxy(endpoint, subprocess=True, delay=args.latency_ms / 1000)
        options = [f"-o{k}={v}" for k, v in proxy.options.items()]
        cli("dataset", "add", "s3", f"s3://{BUCKET}/{PREFIX}", *options)
        for r in range(args.rounds):
            for kind, extra in (("plain", {}), ("hint", {"order_hint": args.window})):
                cli("dataset", "clean", "s3")
                drop_caches()
                result = api_epoch(master.address, "s3", manifest_path, args, 100 + r,
                                   limit=args.cold_files, **extra)  # fmt: skip
                cold[kind].append(result["seconds"])
            print({k: v[-1] for k, v in cold.items()}, flush=True)
    finally:
        if mnt.is_mount():
            run_cli("umount", str(mnt))
        for w in workers:
            w.stop()
        master.stop()
        if proxy is not None:
            proxy.stop()
        stop(store_proc)
    return report(args, describe(manifest), warm, cold)


def report(args, desc: dict, warm: dict, cold: dict) -> str:
    api_vs_local = [a / b for a, b in zip(warm["api"], warm["local"], strict=True)]
    fuse_vs_local = [a / b for a, b in zip(warm["fuse"], warm["local"], strict=True)]
    speedup = [p / h for p, h in zip(cold["plain"], cold["hint"], strict=True)]
    files = desc["files"]
    return "\n".join([
        f"`{rerun_command('benchmarks/bench_python_api.py')}` on {machine()}.",
        "",
        f"{files:,} rawframes-like files, {desc['bytes'] / 2**20:,.0f} MiB; DataLoader with "
        f"{args.workers} forked workers, batches of {args.batch}, shuffled, every byte checked; "
        f"{args.rounds} rounds, median [range]. Warm: after `cachefs load` (2 workers, RAM tiers "
        f"in /dev/shm, which drop_caches does not drop); local files read with the page cache "
        f"dropped before each epoch.",
        "",
        "| warm epoch | seconds | files/s | × local files, page cache dropped |",
        "|---|---:|---:|---:|",
        f"| local files, page cache dropped | {span(warm['local'])} "
        f"| {files / statistics.median(warm['local']):,.0f} | 1.00 |",
        f"| **cachefs.torch.CachefsDataset** | {span(warm['api'])} "
        f"| {files / statistics.median(warm['api']):,.0f} | **{span(api_vs_local)}** |",
        f"| cluster FUSE mount, unbuffered reads | {span(warm['fuse'])} "
        f"| {files / statistics.median(warm['fuse']):,.0f} | {span(fuse_vs_local)} |",
        "",
        f"Cold ({args.store} behind the store proxy at {args.latency_ms:g} ms; the cache emptied "
        f"before each epoch of {args.cold_files:,} files):",
        "",
        "| cold epoch | seconds | files/s |",
        "|---|---:|---:|",
        f"| CachefsDataset, no hint | {span(cold['plain'])} "
        f"| {args.cold_files / statistics.median(cold['plain']):,.0f} |",
        f"| CachefsDataset + EpochPrefetchSampler (window {args.window}) | {span(cold['hint'])} "
        f"| {args.cold_files / statistics.median(cold['hint']):,.0f} |",
        "",
        f"Order hint speedup: **{span(speedup)}×**.",
    ]) + "\n"  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--cold-files", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--latency-ms", type=float, default=10.0)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--store", choices=("moto", "s3rver"), default="moto")
    p.add_argument("--worker-mem", default="2G")
    p.add_argument("--data", type=Path, default=Path("/tmp/cachefs-bench-api-data"))
    p.add_argument("--results", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cachefs-bench-api-") as work:
        text = run(args, Path(work))
    print(text)
    if args.results:
        replace_section(args.results, "Python API (#16)" + (
            "" if args.store == "moto" else f", {args.store} store"), text)  # fmt: skip


if __name__ == "__main__":
    main()
