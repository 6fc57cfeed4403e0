"""How fast does `cachefs load` fill the cache, next to the store's own parallel GET rate?

One run, same objects, same S3-protocol server (moto on 127.0.0.1):
  * the store's max parallel GET rate: pyarrow reads of every object from T threads (the best
    of T in --threads);
  * `cachefs load` into a master + 2 workers (processes), timed from submit to the final line.

    python benchmarks/bench_load.py [--files 2000] [--results benchmarks/results.md]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import replace_section  # noqa: E402
from tests.conftest import MotoServer, _start_moto, set_fake_aws_credentials  # noqa: E402
from tests.procs import master_process, run_cli, worker_process  # noqa: E402


def make_objects(count: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        f"frames/v{i // 10:05d}/img_{i % 10:05d}.jpg": rng.randbytes(
            min(int(rng.lognormvariate(10.8, 0.8)), 4 << 20)
        )
        for i in range(count)
    }


def store_get_rate(endpoint: str, bucket: str, keys: list[str], threads: int) -> float:
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")

    def get(key):
        with fs.open_input_stream(f"{bucket}/{key}") as f:
            return len(f.read())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(get, keys))
    assert total > 0
    return len(keys) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    set_fake_aws_credentials()
    work = Path(tempfile.mkdtemp(prefix="cachefs-bench-load-"))
    moto, endpoint = _start_moto(work / "moto.log")
    master = master_process(work)
    workers = [worker_process(work, "127.0.0.1:0", f"w{i}", "1G") for i in (1, 2)]
    try:
        server = MotoServer(endpoint)
        objects = make_objects(args.files)
        server.create_bucket("bench")
        server.upload("bench", objects)
        total_bytes = sum(map(len, objects.values()))
        rates = {t: store_get_rate(endpoint, "bench", list(objects), t) for t in args.threads}
        best_threads, best_rate = max(rates.items(), key=lambda kv: kv[1])

        master.start()
        for w in workers:
            w.args[w.args.index("--master") + 1] = master.address
            w.start()
        added = run_cli(
            "dataset",
            "add",
            "bench",
            "s3://bench/frames",
            "--master",
            master.address,
            "-o",
            f"endpoint_override={endpoint}",
            "-o",
            "scheme=http",
        )
        assert added.returncode == 0, added.stderr
        started = time.perf_counter()
        loaded = run_cli("load", "bench", "--master", master.address, timeout=3600)
        load_s = time.perf_counter() - started
        assert loaded.returncode == 0 and f"{args.files}/{args.files} files" in loaded.stdout, (
            loaded
        )
        load_rate = args.files / load_s
    finally:
        for w in workers:
            w.stop()
        master.stop()
        moto.terminate()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "| what | files/s | MiB/s | ratio to the store's best |",
        "|---|---:|---:|---:|",
    ]
    for threads, rate in rates.items():
        lines.append(
            f"| store GETs, pyarrow, {threads} threads | {rate:,.0f} | "
            f"{rate * total_bytes / args.files / 2**20:,.1f} | {rate / best_rate:.2f} |"
        )
    lines.append(
        f"| `cachefs load` (master + 2 workers) | {load_rate:,.0f} | "
        f"{load_rate * total_bytes / args.files / 2**20:,.1f} | {load_rate / best_rate:.2f} |"
    )
    table = "\n".join(lines)
    print(table)
    if args.results:
        note = (
            f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with "
            f"`python benchmarks/bench_load.py --files {args.files}`: {args.files} log-normal "
            f"objects ({total_bytes / 2**20:.0f} MiB) in moto on 127.0.0.1; the store's best "
            f"parallel rate was with {best_threads} threads. moto, master, workers and the "
            "readers share the cores, so the store is as fast as this machine lets it be."
        )
        replace_section(args.results, "Load (bench_load.py)", note + "\n\n" + table)


if __name__ == "__main__":
    main()
