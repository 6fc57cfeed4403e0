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

`--delay-ms D` puts a small TCP proxy (a subprocess) between every S3 reader and moto that
holds each client-to-server chunk (about one per HTTP request) for D ms, a crude stand-in for
a remote store's first-byte latency; without it "remote" is loopback-fast.

    python benchmarks/bench_read.py                 # ~3,000 files (needs root for drop_caches)
    python benchmarks/bench_read.py --quick         # ~1,000 files
    python benchmarks/bench_read.py --delay-ms 20   # emulate a slower remote store

Prints a Markdown table; `--results benchmarks/results.md` also replaces this benchmark's
section in that file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import trio
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import replace_section  # noqa: E402
from cachefs.errors import CacheFsError  # noqa: E402
from cachefs.fuse.mount import pid_file  # noqa: E402
from cachefs.rpc import RpcClient  # noqa: E402
from cachefs.worker.tier import BLOCK_SIZE  # noqa: E402
from tests.conftest import MotoServer, _free_port, _start_moto  # noqa: E402
from tests.procs import run_cli  # noqa: E402

MiB = 1 << 20
FRAMES_PER_DIR = 10
SMALL_MEDIAN, SMALL_SIGMA = 48_000, 0.8  # frames: log-normal, median ~48 KB
LARGE_EVERY = 100  # one file in LARGE_EVERY is "large": log-normal median 2.5 MB, capped
LARGE_MEDIAN, LARGE_SIGMA, LARGE_CAP = 2_500_000, 0.5, 6 * MiB
BUCKET, PREFIX = "bench-read", "rawframes"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# relative path -> (size, xxh3_64 of the content)
Manifest = dict[str, tuple[int, int]]


# --- data -------------------------------------------------------------------------------------


def make_dataset(root: Path, files: int, seed: int) -> Manifest:
    """`files` seeded pseudo-random frames in directories of 10 under `root`."""
    rng = random.Random(seed)
    manifest = {}
    for i in range(files):
        video = i // FRAMES_PER_DIR
        rel = f"class_{video // 100:03d}/video_{video:05d}/img_{i % FRAMES_PER_DIR:05d}.jpg"
        if rng.randrange(LARGE_EVERY) == 0:
            size = rng.lognormvariate(math.log(LARGE_MEDIAN), LARGE_SIGMA)
            size = min(int(size), LARGE_CAP)
        else:
            size = max(1, int(rng.lognormvariate(math.log(SMALL_MEDIAN), SMALL_SIGMA)))
        data = rng.randbytes(size)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest[rel] = (size, xxhash.xxh3_64_intdigest(data))
    return manifest


def upload(server: MotoServer, root: Path, manifest: Manifest, threads: int) -> None:
    client = server.client  # boto3 clients are thread-safe

    def put(rel: str) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}", Body=(root / rel).read_bytes())

    server.create_bucket(BUCKET)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, manifest))


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --- the reader -------------------------------------------------------------------------------


def read_pass(read: Callable[[str], bytes], order: list[str], manifest: Manifest, threads: int):
    """Reads every file of `order` with `threads` threads taking the next file in order.

    Returns (seconds, bytes); raises if any file was unreadable or had the wrong content.
    """
    counter = itertools.count()  # next() on it is atomic under the GIL

    def reader() -> int:
        total = 0
        while (i := next(counter)) < len(order):
            rel = order[i]
            data = read(rel)
            size, digest = manifest[rel]
            if len(data) != size or xxhash.xxh3_64_intdigest(data) != digest:
                raise AssertionError(f"{rel}: wrong content ({len(data)} bytes, expected {size})")
            total += len(data)
        return total

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(reader) for _ in range(threads)]
        total = sum(f.result() for f in futures)
    return time.perf_counter() - started, total


def file_reader(root: Path) -> Callable[[str], bytes]:
    def read(rel: str) -> bytes:
        with open(root / rel, "rb") as f:
            return f.read()

    return read


def s3_reader(endpoint: str) -> Callable[[str], bytes]:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=AWS_ENV["AWS_ACCESS_KEY_ID"],
        secret_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region=AWS_ENV["AWS_DEFAULT_REGION"],
        endpoint_override=endpoint,
        scheme="http",
    )

    def read(rel: str) -> bytes:
        with fs.open_input_stream(f"{BUCKET}/{PREFIX}/{rel}") as f:
            return f.read()

    return read


class CpuMeter:
    """CPU seconds used by this process and by other processes (by pid) during a block."""

    def __init__(self, **pids: int | None):
        self.procs = {"reader": psutil.Process()}
        self.procs.update({name: psutil.Process(pid) for name, pid in pids.items() if pid})

    def _now(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            out[name] = times.user + times.system
        return out

    @contextlib.contextmanager
    def measure(self, into: dict):
        before = self._now()
        yield
        after = self._now()
        into.update({name: after[name] - before[name] for name in before if name in after})


# --- the mount --------------------------------------------------------------------------------


def listening_ports(pid: int) -> list[int]:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN})


def worker_stats(pid: int) -> dict | None:
    """The embedded worker's `stats` (found among the mount process's listening ports)."""

    async def ask() -> dict | None:
        for port in listening_ports(pid):
            try:
                async with RpcClient(("127.0.0.1", port), timeout=10) as client:
                    reply = await client.call("stats")
            except CacheFsError:
                continue  # the embedded master: no such method
            if isinstance(reply, dict) and "remote_reads" in reply:
                return reply
        return None

    return trio.run(ask)


def remote_reads_needed(manifest: Manifest) -> int:
    """Remote reads that fill the cache: one per file, one per 4 MiB block of larger files."""
    return sum(1 if size <= BLOCK_SIZE else -(-size // BLOCK_SIZE) for size, _ in manifest.values())


@contextlib.contextmanager
def profiled(pid: int, out_dir: Path | None, label: str):
    """py-spy records `pid` while the block runs: 200 Hz, only samples holding the GIL (where
    the process's Python CPU goes), collapsed stacks; sampling pauses the process briefly."""
    if out_dir is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"cachefs-{label}.txt"
    proc = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
        + ["--rate", "200", "--gil"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()  # "py-spy> Sampling process ..." once it is attached
    if "Sampling" not in line:
        proc.kill()
        raise RuntimeError(f"py-spy did not start: {line.strip()} {proc.stdout.read()[-500:]}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        print(f"profile of the mount process: {out}", flush=True)


def unmount(mountpoint: Path) -> None:
    if not os.path.ismount(mountpoint):
        return
    result = run_cli("umount", str(mountpoint), timeout=60)
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        print(f"umount failed ({result.stderr.strip()}); lazily unmounted", file=sys.stderr)


# --- a latency-adding proxy in front of moto ----------------------------------------------------


async def _proxy(listen_port: int, target: str, delay: float) -> None:
    host, port = target.rsplit(":", 1)

    async def pump(src, dst, hold: float) -> None:
        try:
            while data := await src.read(1 << 16):
                if hold:
                    await asyncio.sleep(hold)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    async def handle(client_r, client_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pump(client_r, server_w, delay), pump(server_r, client_w, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, backlog=512)
    print("proxy ready", flush=True)
    async with server:
        await server.serve_forever()


def start_proxy(target: str, delay_ms: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--proxy-serve", str(port), target, str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.stdout.readline().strip() != "proxy ready":
        proc.kill()
        raise RuntimeError("the delay proxy did not start")
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the run ----------------------------------------------------------------------------------


def run(args, workdir: Path) -> tuple[list[dict], dict]:
    info: dict = {}
    os.environ.update(AWS_ENV)  # boto3, pyarrow and the mount process read them
    moto = proxy = None
    mountpoint = workdir / "mnt"
    shm_dir: Path | None = None
    try:
        moto, endpoint = _start_moto(workdir / "moto.log")
        server = MotoServer(endpoint)
        local = workdir / "local"
        t = time.perf_counter()
        manifest = make_dataset(local, args.files, args.seed)
        upload(server, local, manifest, args.threads)
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
            proxy, endpoint = start_proxy(endpoint, args.delay_ms)
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
        measure("direct S3 (pyarrow)", s3_reader(endpoint), meter, drop=True)

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
        pid = int(pid_file(mountpoint).read_text())
        info["mount_pid"] = pid
        print(f"mounted in {info['mount_s']:.1f} s (pid {pid}, metadata synced)", flush=True)
        before = worker_stats(pid)
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
            counters.append(worker_stats(pid))
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
        stop(proxy)
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
    if len(sys.argv) == 5 and sys.argv[1] == "--proxy-serve":  # the delay proxy subprocess
        asyncio.run(_proxy(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) / 1000))
        return
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
        argv = list(sys.argv[1:])
        if "--results" in argv:
            del argv[argv.index("--results") : argv.index("--results") + 2]
        command = shlex.join(["python", "benchmarks/bench_read.py", *argv])
        cores = os.cpu_count()
        remote = (
            f"each S3 request held {args.delay_ms:g} ms by a TCP proxy"
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
