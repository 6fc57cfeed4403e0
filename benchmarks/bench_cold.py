"""The cold path (#14), side by side in one run: sync, the first epoch, `cachefs load`, faults.

    python benchmarks/bench_cold.py [--files 20000] [--epoch-files 3000] [--rounds 3]
        [--latency-ms 10] [--results benchmarks/results.md]

The store is moto behind tests/store_proxy.py (a subprocess) adding --latency-ms to every
answer and counting requests by kind. The dataset is rawframes-like (benchmarks/dataset.py),
10 frames per directory. Epochs read --epoch-files files with 8 threads in a clip order (the
directories shuffled, each directory's frames in order), content verified, page cache dropped
and the cache emptied (`cachefs dataset clean`) before each cold pass. cachefs runs as a master,
2 workers and cluster mounts on this host.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dataset import Shape, describe, ensure_dataset  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    AWS_ENV,
    check,
    drop_caches,
    git_state,
    machine,
    pyarrow_s3,
    read_pass,
    s3_reader,
    start_store,
    stop,
    upload,
)
from benchmarks.results import median_range, replace_section  # noqa: E402
from tests.conftest import _free_port  # noqa: E402
from tests.procs import master_process, run_cli, worker_process  # noqa: E402
from tests.store_proxy import StoreProxy  # noqa: E402

BUCKET, PREFIX, NAME = "bench-cold", "data", "cold"
FAULTS = {  # the issue's flaky stores
    "20% HTTP 503": {"fail_rate": 0.2},
    "20% connection resets": {"reset_rate": 0.2},
    "4 s stalls on 10%": {"stall_rate": 0.1, "stall_seconds": 4.0},
}


S3RVER = "s3rver@3.7.1"  # a Node.js S3 server (npm): several times moto's GET rate here


def start_s3rver(work: Path) -> tuple[subprocess.Popen, str]:
    """s3rver on a free loopback port, installed once into ~/.cache; its fixed credentials
    become everyone's (this process's readers, the cachefs processes it starts)."""
    cache = Path.home() / ".cache" / "cachefs-bench" / "s3rver"
    binary = cache / "node_modules" / ".bin" / "s3rver"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", S3RVER],
                       cwd=cache, check=True)  # fmt: skip
    credentials = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    AWS_ENV.update(credentials)
    os.environ.update(credentials)
    port = _free_port()
    (work / "s3rver").mkdir()
    proc = subprocess.Popen(
        [str(binary), "-d", str(work / "s3rver"), "-a", "127.0.0.1", "-p", str(port),
         "--configure-bucket", BUCKET, "--silent",
         "--allow-mismatched-signatures"],  # the proxy's Host is not the signed one
        env={**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"},  # its token cipher
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("s3rver did not start") from None
            time.sleep(0.1)  # polling the port while node starts


def put_all(endpoint: str, root: Path, manifest) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=f"http://{endpoint}", client_options={"allow_http": True})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda rel: obstore.put(store, f"{PREFIX}/{rel}", (root / rel).read_bytes()),
                      manifest))  # fmt: skip


def clip_order(manifest, files: int, seed: int) -> list[str]:
    """Whole directories, shuffled, each read frame by frame, until `files` files."""
    clips: dict[str, list[str]] = {}
    for rel in sorted(manifest):
        clips.setdefault(rel.rsplit("/", 1)[0], []).append(rel)
    dirs = sorted(clips)
    random.Random(seed).shuffle(dirs)
    return list(itertools.islice((rel for d in dirs for rel in clips[d]), files))


def old_cachefs(rev: str, into: Path) -> Path:
    """cachefs as of `rev`, importable with PYTHONPATH=<returned dir> (the repo maps master/,
    worker/ and fuse/ to cachefs.*; the venv's editable install comes after PYTHONPATH)."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "cachefs", "master", "worker", "fuse"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for sub in ("master", "worker", "fuse"):
        (src / sub).rename(src / "cachefs" / sub)
    return src


def per_directory_listing(endpoint: str) -> int:
    """The sync before #14: one delimiter listing per directory, 32 at once; entries found."""
    import pyarrow.fs as pafs

    fs = pyarrow_s3(endpoint)
    pending, found = [f"{BUCKET}/{PREFIX}"], 0
    with ThreadPoolExecutor(32) as pool:
        while pending:
            batch, pending = pending[:32], pending[32:]
            for infos in pool.map(lambda d: fs.get_file_info(pafs.FileSelector(d)), batch):
                found += len(infos)
                pending += [i.path for i in infos if i.type == pafs.FileType.Directory]
    return found


def obstore_get_rate(endpoint: str, keys: list[str], threads: int) -> float:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=f"http://{endpoint}", region="us-east-1",
                    client_options={"allow_http": True})  # fmt: skip
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: obstore.get(store, f"{PREFIX}/{k}").bytes(), keys))
    return len(keys) / (time.perf_counter() - started)


def counted_pass(read, order, manifest, threads=8) -> tuple[float, int, int]:
    """Like read_pass, but a failed or wrong read is counted, not raised: (s, errors, wrong)."""
    counter, errors, wrong, lock = itertools.count(), [0], [0], threading.Lock()

    def reader():
        while (i := next(counter)) < len(order):
            try:
                data = read(order[i])
            except Exception:  # noqa: BLE001 - any failure is what this pass counts
                with lock:
                    errors[0] += 1
                continue
            try:
                check(order[i], data, manifest)
            except AssertionError:
                with lock:
                    wrong[0] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(reader) for _ in range(threads)]:
            future.result()
    return time.perf_counter() - started, errors[0], wrong[0]


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.rows: dict[str, list[dict]] = {}
        self.notes: list[str] = []

    def cli(self, *argv, timeout=3600):
        result = run_cli(*argv, "--master", self.master.address, timeout=timeout)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result

    def empty_cache(self) -> None:
        self.cli("dataset", "clean", NAME)
        drop_caches()

    def record(self, system: str, seconds: float, files: int, **extra) -> None:
        counts = self.proxy.counts()
        self.rows.setdefault(system, []).append({
            "files_s": files / seconds, "seconds": seconds,
            "requests": counts["requests"] / files, "gets": counts["gets"] / files,
            "heads": counts["heads"] / files, **extra,
        })  # fmt: skip
        print(f"{system}: {files / seconds:,.0f} files/s, {counts}", flush=True)

    def run(self) -> str:
        args = self.args
        data, manifest = ensure_dataset(args.data, Shape(files=args.files))
        if args.store == "s3rver":
            store_proc, endpoint = start_s3rver(self.work)
        else:
            store_proc, server = start_store(self.work / "moto.log")
            endpoint = server.endpoint
        self.proxy = StoreProxy(endpoint, subprocess=True, delay=args.latency_ms / 1000)
        self.master = master_process(self.work)
        workers = [worker_process(self.work, "127.0.0.1:0", f"w{i}", "2G") for i in (1, 2)]
        mounts = {"plain": self.work / "mnt-plain", "prefetch": self.work / "mnt-prefetch"}
        try:
            if args.store == "s3rver":
                put_all(endpoint, data, manifest)
            else:
                upload(server, BUCKET, PREFIX, data, manifest, threads=16)
            self.master.start()
            for w in workers:
                w.args[w.args.index("--master") + 1] = self.master.address
                w.start()
            self.sync_rows(manifest)
            order = clip_order(manifest, args.epoch_files, seed=7)
            (self.work / "order.txt").write_text("\n".join(order) + "\n")
            for name, mnt in mounts.items():
                mnt.mkdir()
                extra = ("--prefetch", "0") if name == "plain" else ()
                self.cli("mount", NAME, str(mnt), *extra)
            best = self.store_rate(order)
            for _ in range(args.rounds):
                self.cold_round(order, manifest, mounts)
            self.load_rows(order, best)
            self.fault_rows(manifest, mounts)
        finally:
            for mnt in mounts.values():
                if mnt.is_mount():
                    run_cli("umount", str(mnt))
            for w in workers:
                w.stop()
            self.master.stop()
            self.proxy.stop()
            stop(store_proc)
        return self.report(manifest, best)

    def old_sync(self) -> tuple[float, float, int]:
        """`dataset add` and an unchanged `dataset sync` by the cachefs of --baseline-rev (its
        own master process): seconds each, and the listing requests of the add."""
        pythonpath = str(old_cachefs(self.args.baseline_rev, self.work / "old"))
        env = {"PYTHONPATH": pythonpath}
        master = master_process(self.work / "old")
        here = os.getcwd()
        os.chdir(self.work / "old")  # `python -m` puts the cwd first: not this checkout
        os.environ["PYTHONPATH"] = pythonpath  # the master process inherits it
        try:
            master.start()
        finally:
            del os.environ["PYTHONPATH"]
        try:
            options = [f"-o{k}={v}" for k, v in self.proxy.options.items()]
            timed = []
            self.proxy.reset_counts()
            for argv in (("dataset", "add", NAME, f"s3://{BUCKET}/{PREFIX}", *options),
                         ("dataset", "sync", NAME)):  # fmt: skip
                started = time.perf_counter()
                result = run_cli(*argv, "--master", master.address, timeout=3600, env=env)
                assert result.returncode == 0, result.stderr
                timed.append(time.perf_counter() - started)
                if len(timed) == 1:
                    lists = self.proxy.counts()["lists"]
        finally:
            master.stop()
            os.chdir(here)
        return timed[0], timed[1], lists

    def sync_rows(self, manifest) -> None:
        self.old = self.old_sync() if self.args.baseline_rev else None
        self.proxy.reset_counts()
        started = time.perf_counter()
        # pyarrow's directory probes find nothing in s3rver's nested trees: moto only
        entries = per_directory_listing(self.proxy.endpoint) if self.old else 0
        old = time.perf_counter() - started if self.old else float("nan")
        old_lists = self.proxy.counts()["lists"]
        self.proxy.reset_counts()
        started = time.perf_counter()
        options = [f"-o{k}={v}" for k, v in self.proxy.options.items()]
        self.cli("dataset", "add", NAME, f"s3://{BUCKET}/{PREFIX}", *options)
        new = time.perf_counter() - started
        new_lists = self.proxy.counts()["lists"]
        self.proxy.reset_counts()
        started = time.perf_counter()
        self.cli("dataset", "sync", NAME)
        resync = time.perf_counter() - started
        self.sync = {"old": (old, old_lists, entries), "new": (new, new_lists),
                     "resync": (resync, self.proxy.counts()["lists"])}  # fmt: skip

    def store_rate(self, order) -> tuple[int, float]:
        rates = {}
        for threads in (8, 32, 64, 128):
            rates[threads] = obstore_get_rate(self.proxy.endpoint, order, threads)
        best = max(rates.items(), key=lambda kv: kv[1])
        self.notes.append("store GETs/s by threads (obstore): " + ", ".join(
            f"{t}: {r:,.0f}" for t, r in rates.items()))  # fmt: skip
        return best

    def cold_round(self, order, manifest, mounts) -> None:
        n = len(order)
        drop_caches()
        self.proxy.reset_counts()
        seconds, _ = read_pass(s3_reader(self.proxy.endpoint, BUCKET, PREFIX), order, manifest, 8)
        self.record("direct pyarrow reads (HEAD + GET)", seconds, n)
        for name, label in (("plain", "cachefs cluster mount, no prefetch"),
                            ("prefetch", "cachefs cluster mount, directory prefetch")):  # fmt: skip
            self.empty_cache()
            self.proxy.reset_counts()
            seconds, _ = read_pass(lambda rel, m=mounts[name]: (m / rel).read_bytes(),
                                   order, manifest, 8)  # fmt: skip
            self.record(label, seconds, n)
        self.empty_cache()
        self.proxy.reset_counts()
        hint = subprocess.Popen(
            [sys.executable, "-m", "cachefs.cli", "prefetch", NAME, "--order",
             str(self.work / "order.txt"), "--window", str(self.args.window),
             "--master", self.master.address], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        seconds, _ = read_pass(lambda rel: (mounts["prefetch"] / rel).read_bytes(),
                               order, manifest, 8)  # fmt: skip
        self.record("cachefs cluster mount, directory + order prefetch", seconds, n)
        hint.wait(600)

    def load_rows(self, order, best) -> None:
        (self.work / "files.txt").write_text("\n".join(order) + "\n")
        for _ in range(self.args.rounds):
            self.empty_cache()
            self.proxy.reset_counts()
            started = time.perf_counter()
            out = self.cli("load", NAME, "--files", str(self.work / "files.txt")).stdout
            self.record("`cachefs load` (2 workers)", time.perf_counter() - started, len(order),
                        vs_store=len(order) / (time.perf_counter() - started) / best[1],
                        failed=int(out.split(" failed")[0].rsplit(" ", 1)[1]))  # fmt: skip

    def fault_rows(self, manifest, mounts) -> None:
        order = clip_order(manifest, self.args.fault_files, seed=8)
        (self.work / "fault-files.txt").write_text("\n".join(order) + "\n")
        self.faults = []
        for label, faults in FAULTS.items():
            self.proxy.set(**faults)
            drop_caches()
            direct = counted_pass(s3_reader(self.proxy.endpoint, BUCKET, PREFIX), order, manifest)
            self.empty_cache()
            cold = counted_pass(lambda rel: (mounts["prefetch"] / rel).read_bytes(), order,
                                manifest)  # fmt: skip
            self.empty_cache()
            result = run_cli("load", NAME, "--files", str(self.work / "fault-files.txt"),
                             "--master", self.master.address, timeout=3600)  # fmt: skip
            line = (result.stdout.strip().splitlines() or ["?"])[-1]
            self.faults.append((label, direct, cold, line))
            self.proxy.set(fail_rate=0.0, reset_rate=0.0, stall_rate=0.0)
            print(label, direct, cold, line, flush=True)

    def report(self, manifest, best) -> str:
        info = describe(manifest)
        direct = self.rows["direct pyarrow reads (HEAD + GET)"]
        lines = ["| system | files/s | × direct | store requests per file (GET, HEAD) |",
                 "|---|---:|---:|---|"]  # fmt: skip
        for system, rows in self.rows.items():
            rates = [r["files_s"] for r in rows]
            ratios = [r["files_s"] / d["files_s"] for r, d in zip(rows, direct, strict=False)]
            if system.startswith("`cachefs load`"):
                ratios = [r["vs_store"] for r in rows]
            lines.append(
                f"| {system} | {median_range(rates, ',.0f')} | {median_range(ratios, '.2f')}"
                f"{' (× the store best)' if system.startswith('`cachefs') else ''} | "
                f"{statistics.median(r['requests'] for r in rows):.2f} "
                f"({statistics.median(r['gets'] for r in rows):.2f}, "
                f"{statistics.median(r['heads'] for r in rows):.2f}) |"
            )
        direct_rate = statistics.median(d["files_s"] for d in direct)
        lines.append(
            f"| the store's best parallel GET rate ({best[0]} threads): the ceiling of one GET "
            f"per file | {best[1]:,.0f} | {best[1] / direct_rate:.2f} | 1.00 (1.00, 0.00) |"
        )
        old, old_lists, entries = self.sync["old"]
        new, new_lists = self.sync["new"]
        resync, resync_lists = self.sync["resync"]
        old_add, old_sync, old_add_lists = self.old or (float("nan"), float("nan"), 0)
        rev = self.args.baseline_rev or "(not run)"
        sync = [
            "| listing | seconds | listing requests |", "|---|---:|---:|",
            f"| `cachefs dataset add` of {rev} (the sync before #14) | {old_add:.1f} | "
            f"{old_add_lists:,} |",
            f"| `cachefs dataset sync` of {rev}, nothing changed | {old_sync:.1f} | – |",
            f"| its listing alone: per directory, 32 at once ({entries:,} entries) | "
            f"{old:.1f} | {old_lists:,} |",
            f"| `cachefs dataset add` (flat listing, then the namespace written) | {new:.1f} "
            f"({new / old_add:.2f}× of {rev}'s) | {new_lists:,} |",
            f"| `cachefs dataset sync`, nothing changed | {resync:.1f} "
            f"({resync / old_sync:.2f}× of {rev}'s) | {resync_lists:,} |",
        ]  # fmt: skip
        faults = ["| store | direct reads: s, errors | cachefs mount cold: s, errors, wrong "
                  "bytes | `cachefs load` |", "|---|---|---|---|"]  # fmt: skip
        for label, (ds, de, _), (cs, ce, cw), line in self.faults:
            faults.append(f"| {label} | {ds:.1f} s, {de} | {cs:.1f} s, {ce}, {cw} | {line} |")
        head = (
            f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/bench_cold.py "
            f"--files {self.args.files} --epoch-files {self.args.epoch_files} --rounds "
            f"{self.args.rounds} --latency-ms {self.args.latency_ms:g}`, {git_state(ROOT)}. "
            f"{machine()}. Dataset: {info['files']:,} files in {info['dirs']:,} directories, "
            f"{info['bytes'] / 2**20:,.0f} MiB (median {info['median'] / 1000:.0f} KB), in "
            f"{self.args.store} behind the store proxy ({self.args.latency_ms:g} ms per answer). "
            f"Epochs: {self.args.epoch_files:,} files, 8 threads, whole directories in a shuffled "
            "order, content verified; before each cold pass the page cache is dropped and the "
            "cache emptied. Median [min–max] of the rounds; store requests counted at the proxy. "
            f"The store's best parallel GET rate: {best[1]:,.0f}/s with {best[0]} threads "
            f"({'; '.join(self.notes)}). {self.args.store}, the proxy, master, 2 workers, 2 "
            "mounts and the readers share 2 cores."
        )
        return "\n\n".join([head, "**Cold epoch and load**", "\n".join(lines),
                            "**Metadata sync**", "\n".join(sync),
                            f"**Faulty store** ({self.args.fault_files:,} files, one pass each)",
                            "\n".join(faults)])  # fmt: skip


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--epoch-files", type=int, default=3000)
    parser.add_argument("--fault-files", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--store", choices=("moto", "s3rver"), default="moto",
                        help="the S3 server behind the proxy (s3rver: npm, Node.js)")
    parser.add_argument("--window", type=int, default=256, help="cachefs prefetch --window")
    parser.add_argument("--data", type=Path, default=Path("/tmp/cachefs-bench-cold-data"))
    parser.add_argument("--baseline-rev", default="fb637ac",
                        help="the cachefs whose sync the new one is measured against "
                             "('' to skip it)")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cachefs-bench-cold-") as work:
        text = Bench(args, Path(work)).run()
    print(text)
    if args.results:
        title = "Cold path (#14)" + ("" if args.store == "moto" else f", {args.store} store")
        replace_section(args.results, title, text)


if __name__ == "__main__":
    main()
