"""Every way to read the training set, in one run: local disk, the store, cachefs, rclone, s3fs.

One seeded rawframes-like dataset (benchmarks/dataset.py) is written to local disk and uploaded
to a moto S3 server on 127.0.0.1; every remote reader goes through a proxy (tests/store_proxy.py)
that holds each answer --delay-ms (default 2 ms), a remote store's first-byte latency. Then,
in this order, each system is measured with the same readers:

  * read pass: N threads (--threads 8) read every file once, whole, in one seeded shuffled
    order, and check its size and xxh3_64 against the manifest;
  * metadata pass: os.walk + os.stat of every file (right after mounting, so cold), names and
    sizes checked; for the store, one recursive listing;
  * DataLoader epoch: benchmarks/torch_epoch.py (num_workers 4, batches of file contents, no
    model), for local disk and the cachefs mounts.

Systems and states ("drop" = `echo 3 > /proc/sys/vm/drop_caches` first):
  * local disk: page cache dropped; warm (page cache);
  * direct S3: pyarrow S3FileSystem reads of the store (the "read the remote store directly"
    baseline; a HEAD and a GET per file);
  * cachefs embedded (`cachefs mount s3://...`: master, worker and client in one process):
    cold (empty cache), warm (drop: data from the worker's RAM tier), second epoch (page cache);
  * cachefs cluster (master + 2 workers + the mount, four processes): cold, then `cachefs
    dataset clean` and `cachefs load` (timed), after load (drop), second epoch;
  * rclone mount --vfs-cache-mode full and s3fs -o use_cache (Debian packages, installed with
    apt-get when missing): cold, warm (drop: data from their disk caches), second epoch.
A peer that cannot be installed or mounted is reported as a failed row; the run goes on. A
wrong byte or a wrong listing anywhere fails the run.

Every cachefs read pass also records the FUSE requests it caused (the mount's Prometheus
counters) and the mount process's CPU. After the measured passes, each cachefs mode gets one
more warm pass for CPU per file in every process, then warm passes for --profile-seconds under
py-spy (the mount process, and the master and workers in cluster mode), summarized by part.

    python benchmarks/run_all.py --quick        # 1,000 files (~70 MiB), under 5 minutes
    python benchmarks/run_all.py --files 8000   # ~540 MiB, ~17 minutes on 2 cores
    python benchmarks/run_all.py                # 20,000 files (~1.3 GiB), ~40 minutes
    python benchmarks/run_all.py --files 5000 --skip rclone s3fs

Prints the tables; writes its section of benchmarks/results.md and a bar chart
(benchmarks/results.png; results-quick.png for --quick). Needs root (drop_caches, FUSE).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.dataset import (  # noqa: E402
    Shape,
    add_shape_arguments,
    describe,
    ensure_dataset,
    shape_from,
)
from benchmarks.harness import ContentError, CpuMeter, MiB, drop_caches  # noqa: E402
from benchmarks.results import replace_section  # noqa: E402
from cachefs.worker.tier import BLOCK_SIZE  # noqa: E402
from tests.conftest import _free_port  # noqa: E402
from tests.procs import ServiceProcess, master_process, run_cli  # noqa: E402
from tests.store_proxy import StoreProxy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET, PREFIX = "bench-all", "rawframes"
DATASET = "frames"  # the cluster's dataset name
PEERS = {"rclone": "rclone", "s3fs": "s3fs"}  # binary -> Debian package

# what a row's data came from, for "× best peer": the best peer row of the same class
REMOTE, CACHE, PAGE_CACHE = "remote", "cache", "page cache"

LOCAL = "local disk"
DIRECT = "direct S3 (pyarrow)"
EMBEDDED = "cachefs embedded"
CLUSTER = "cachefs cluster"
RCLONE = "rclone vfs full"
S3FS = "s3fs use_cache"
PEER_SYSTEMS = (RCLONE, S3FS)
SECTION_SYSTEMS = {  # --skip names -> systems
    "local": LOCAL,
    "direct": DIRECT,
    "embedded": EMBEDDED,
    "cluster": CLUSTER,
    "rclone": RCLONE,
    "s3fs": S3FS,
}
COLORS = {
    LOCAL: "#7f7f7f",
    DIRECT: "#8c564b",
    EMBEDDED: "#1f77b4",
    CLUSTER: "#17becf",
    RCLONE: "#ff7f0e",
    S3FS: "#2ca02c",
}


@dataclass
class Row:
    kind: str  # "read", "metadata", "loader"
    system: str
    state: str
    cls: str = CACHE
    seconds: float | None = None
    files: int = 0
    bytes: int = 0
    cpu: dict = field(default_factory=dict)
    responses: int | None = None  # store responses during the row
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.seconds)

    @property
    def files_s(self) -> float:
        return self.files / self.seconds if self.ok else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / MiB / self.seconds if self.ok else 0.0


class Bench:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.rows: list[Row] = []
        self.info: dict = {"setup": {}, "checks": [], "profiles": {}}
        self.failures: dict[str, str] = {}  # system -> why its section stopped
        self.stack = contextlib.ExitStack()

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> None:
        with self.stack:
            self.prepare()
            sections = {
                "local": self.local_disk,
                "direct": self.direct,
                "embedded": self.cachefs_embedded,
                "cluster": self.cachefs_cluster,
                "rclone": self.rclone,
                "s3fs": self.s3fs,
            }
            for name, section in sections.items():
                if name in self.args.skip:
                    continue
                self.section(name, section)

    def section(self, name: str, fn) -> None:
        """Runs one system's rows; anything but a content error becomes a failed row."""
        print(f"--- {name}", flush=True)
        first = len(self.rows)
        with contextlib.ExitStack() as cleanup:
            try:
                fn(cleanup)
            except ContentError:
                raise
            except Exception as exc:
                reason = one_line(f"{type(exc).__name__}: {exc}")
                self.failures[name] = reason
                (self.workdir / f"{name}-traceback.txt").write_text(traceback.format_exc())
                print(f"{name} FAILED: {reason}", flush=True)
                if self.args.keep_going is False:
                    raise
                if all(r.ok for r in self.rows[first:]):
                    system = SECTION_SYSTEMS[name]
                    self.rows.append(Row("read", system, "(rest of the section)", error=reason))
        for row in self.rows[first:]:  # rows the section did not reach are failed, with the reason
            if row.seconds is None and row.error is None:
                row.error = self.failures.get(name, "not run")

    def prepare(self) -> None:
        args, setup = self.args, self.info["setup"]
        t = time.perf_counter()
        self.info["bench_extra"] = harness.ensure_bench_extra(REPO)
        if self.info["bench_extra"]:
            print(f"no chart/profile: {self.info['bench_extra']}", flush=True)
            args.no_profile = args.no_profile or "py-spy" in self.info["bench_extra"]
        setup["install [bench] extra"] = time.perf_counter() - t
        if not {"rclone", "s3fs"} <= set(args.skip):
            t = time.perf_counter()
            wanted = {b: p for b, p in PEERS.items() if b not in args.skip}
            self.unavailable = harness.ensure_tools(wanted)
            setup["install peers"] = time.perf_counter() - t
        else:
            self.unavailable = {}
        t = time.perf_counter()
        data_dir = args.data_dir or self.workdir / "dataset"
        self.local, self.manifest = ensure_dataset(data_dir, self.shape)
        self.manifest_path = data_dir / "manifest.json"
        self.info["dataset"] = describe(self.manifest)
        setup["make dataset"] = time.perf_counter() - t
        t = time.perf_counter()
        moto, self.server = harness.start_store(self.workdir / "moto.log")
        self.stack.callback(harness.stop, moto)
        harness.upload(self.server, BUCKET, PREFIX, self.local, self.manifest, 8)
        setup["upload to the store"] = time.perf_counter() - t
        self.proxy = StoreProxy(self.server.endpoint, subprocess=True, delay=args.delay_ms / 1000)
        self.stack.callback(self.proxy.stop)
        self.endpoint = self.proxy.endpoint
        self.meter = CpuMeter(moto=moto.pid, proxy=self.proxy.pid)
        self.order = sorted(self.manifest)
        random.Random(args.seed + 1).shuffle(self.order)
        info = self.info["dataset"]
        print(
            f"dataset: {info['files']:,} files in {info['dirs']:,} directories, "
            f"{info['bytes'] / MiB:,.0f} MiB ({info['above_4mib']} above 4 MiB); "
            + ", ".join(f"{k} {v:.0f} s" for k, v in setup.items()),
            flush=True,
        )

    @property
    def shape(self) -> Shape:
        return shape_from(self.args, self.args.files)

    # ---- measuring -----------------------------------------------------------------------

    def measure(self, row: Row, fn, *, drop: bool) -> Row:
        """Runs fn() (returns seconds[, bytes]) for `row`, with CPU and store responses.

        A pass that leaves the state as it found it (warm ones, not cold or first walks) is
        repeated while the repetitions fit in --repeat-budget seconds, up to --repeat runs;
        the row shows the median run (of two, the slower), and CPU and responses are averaged
        over the runs.
        """
        self.rows.append(row)
        repeat = row.kind in ("read", "loader") and row.cls != REMOTE
        runs: list[tuple[float, int]] = []
        cpu: Counter = Counter()
        split: dict[str, list[float]] = {}
        responses = host = 0.0
        started = time.perf_counter()
        while True:
            if drop:
                drop_caches()
            before = self.proxy.counts()["requests"]
            host_before = host_busy()
            one_cpu: dict = {}
            one_split: dict = {}
            with self.meter.measure(one_cpu, one_split):
                result = fn()
            host += host_busy() - host_before
            responses += self.proxy.counts()["requests"] - before
            cpu.update(one_cpu)
            for name, (user, system) in one_split.items():
                acc = split.setdefault(name, [0.0, 0.0])
                acc[0] += user
                acc[1] += system
            runs.append(result if isinstance(result, tuple) else (result, row.bytes))
            elapsed = time.perf_counter() - started
            if (
                not repeat
                or len(runs) >= self.args.repeat
                or elapsed + runs[-1][0] > self.args.repeat_budget
            ):
                break
        n = len(runs)
        row.seconds, row.bytes = sorted(runs)[n // 2]  # the median; of two, the slower
        row.cpu = {name: value / n for name, value in cpu.items()}
        row.extra["cpu_split"] = {name: (u / n, s / n) for name, (u, s) in split.items()}
        row.extra["host_cpu"] = host / n
        row.extra["runs"] = [seconds for seconds, _ in runs]
        row.responses = round(responses / n)
        what = (
            f"{row.files_s:,.0f} files/s, {row.mib_s:,.1f} MiB/s"
            if row.kind != "metadata"
            else f"{row.files_s:,.0f} files/s"
        )
        runs_note = f", median of {n}: {span(row)} files/s" if n > 1 else ""
        print(
            f"{row.kind:8} {row.system}, {row.state}: {what} ({row.seconds:.1f} s, "
            f"{row.responses} store responses{runs_note})",
            flush=True,
        )
        return row

    def read(
        self, system: str, state: str, cls: str, reader, *, drop: bool, metrics: str | None = None
    ) -> Row:
        """A read pass; with `metrics` (a cachefs mount's), also the FUSE requests it made."""
        row = Row("read", system, state, cls, files=len(self.order))
        before = harness.scrape_fuse_ops(metrics) if metrics else None
        self.measure(
            row,
            lambda: harness.read_pass(reader, self.order, self.manifest, self.args.threads),
            drop=drop,
        )
        if metrics:
            runs = len(row.extra.get("runs", [1]))
            ops = harness.scrape_fuse_ops(metrics) - before
            row.extra["ops"] = {op: n / runs for op, n in ops.items()}
        return row

    def metadata(self, system: str, root: Path | None = None) -> Row:
        row = Row("metadata", system, "walk + stat", files=len(self.manifest))
        if root is None:  # the store: one recursive listing
            row.state = "recursive listing"
            fn = lambda: harness.s3_metadata_pass(  # noqa: E731
                self.endpoint, BUCKET, PREFIX, self.manifest
            )
        else:
            fn = lambda: harness.metadata_pass(root, self.manifest)  # noqa: E731
        return self.measure(row, fn, drop=True)

    def loader(self, system: str, state: str, root: Path, *, drop: bool) -> Row:
        row = Row("loader", system, state, files=len(self.manifest))

        def epoch() -> tuple[float, int]:
            out = harness.dataloader_epoch(
                root, self.manifest_path, self.args.loader_workers, self.args.batch,
                self.args.seed + 2,
            )  # fmt: skip
            row.extra["first_batch_s"] = out["first_batch_s"]
            return out["seconds"], out["bytes"]

        return self.measure(row, epoch, drop=drop)

    # ---- local disk and the store ----------------------------------------------------------

    def local_disk(self, cleanup) -> None:
        reader = harness.file_reader(self.local)
        self.metadata(LOCAL, self.local)
        self.read(LOCAL, "page cache dropped", CACHE, reader, drop=True)
        self.read(LOCAL, "warm (page cache)", PAGE_CACHE, reader, drop=False)
        if "loader" not in self.args.skip:
            self.loader(LOCAL, "page cache dropped", self.local, drop=True)
            self.loader(LOCAL, "warm (page cache)", self.local, drop=False)

    def direct(self, cleanup) -> None:
        self.metadata(DIRECT)
        reader = harness.s3_reader(self.endpoint, BUCKET, PREFIX)
        self.read(DIRECT, "every read remote", REMOTE, reader, drop=True)

    # ---- cachefs ---------------------------------------------------------------------------

    def remote_reads_needed(self) -> int:
        """Remote reads that fill the cache: one per file, one per 4 MiB block of larger ones."""
        sizes = [size for size, _ in self.manifest.values()]
        return sum(-(-size // BLOCK_SIZE) if size > BLOCK_SIZE else 1 for size in sizes)

    def mount_cachefs(self, source: str, mnt: Path, metrics: str, *extra: str) -> int:
        mnt.mkdir(parents=True, exist_ok=True)
        result = run_cli("mount", source, str(mnt), "--metrics", metrics, *extra, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"cachefs mount failed: {result.stderr.strip()}")
        return harness.mount_pid(mnt)

    def warm_profile(self, system: str, mnt: Path, metrics: str, pids: dict[str, int]) -> None:
        """An extra warm pass (drop first) under py-spy, plus CPU per FUSE op without py-spy."""
        reader = harness.file_reader(mnt)
        # CPU per FUSE request, from a clean (unprofiled) warm pass
        meter = CpuMeter(**pids)
        ops_before = harness.scrape_fuse_ops(metrics)
        drop_caches()
        cpu: dict = {}
        split: dict = {}
        with meter.measure(cpu, split):
            seconds, _ = harness.read_pass(reader, self.order, self.manifest, self.args.threads)
        ops = harness.scrape_fuse_ops(metrics) - ops_before
        entry = {
            "seconds": seconds,
            "files": len(self.order),
            "ops": dict(ops),
            "cpu": {name: list(split[name]) for name in split},
        }
        if not self.args.no_profile:
            out_dir = self.workdir / "profiles"
            passes = 0
            drop_caches()
            with harness.profiled(pids, out_dir, system.replace(" ", "-")) as paths:
                started = time.perf_counter()
                while passes == 0 or time.perf_counter() - started < self.args.profile_seconds:
                    if passes:
                        drop_caches()
                    harness.read_pass(reader, self.order, self.manifest, self.args.threads)
                    passes += 1
            entry["profiled_passes"] = passes
            entry["profiles"] = {}
            for name, path in paths.items():
                if path.exists():
                    entry["profiles"][name] = harness.summarize_profile(path)
                    if self.args.keep_profiles:
                        self.args.keep_profiles.mkdir(parents=True, exist_ok=True)
                        shutil.copy(path, self.args.keep_profiles / path.name)
        self.info["profiles"][system] = entry

    def embedded_mem(self) -> str:
        return f"{max(1024, math.ceil(self.info['dataset']['bytes'] * 1.6 / MiB))}M"

    def cachefs_embedded(self, cleanup) -> None:
        mnt = self.workdir / "mnt-embedded"
        metrics = f"127.0.0.1:{_free_port()}"
        drop_caches()
        t = time.perf_counter()
        pid = self.mount_cachefs(
            f"s3://{BUCKET}/{PREFIX}", mnt, metrics,
            "--state", str(self.workdir / "embedded-state"), "--mem", self.embedded_mem(),
            "-o", f"endpoint_override={self.endpoint}", "-o", "scheme=http",
        )  # fmt: skip
        cleanup.callback(cachefs_unmount, mnt)
        self.info["setup"]["cachefs embedded mount (metadata sync)"] = time.perf_counter() - t
        skip_ports = {int(metrics.rsplit(":", 1)[1])}  # Prometheus' HTTP, not RPC

        def stats() -> dict | None:
            return harness.embedded_worker_stats(pid, skip_ports)

        before = stats()
        if before is not None:  # its RAM tier: removed once the mount process is gone
            shm = Path("/dev/shm") / f"cachefs-{before['worker_id']}"
            cleanup.callback(shutil.rmtree, shm, ignore_errors=True)
            cleanup.callback(cachefs_unmount, mnt)
        self.meter.add(cachefs=pid)
        cleanup.callback(self.meter.remove, "cachefs")
        reader = harness.file_reader(mnt)
        self.metadata(EMBEDDED, mnt)
        counters = [before]
        for state, cls, drop in (
            ("cold (empty cache)", REMOTE, True),
            ("warm (RAM cache, page cache dropped)", CACHE, True),
            ("second epoch (page cache)", PAGE_CACHE, False),
        ):
            self.read(EMBEDDED, state, cls, reader, drop=drop, metrics=metrics)
            counters.append(stats())
        if "loader" not in self.args.skip:
            self.loader(EMBEDDED, "warm (page cache dropped)", mnt, drop=True)
            counters.append(stats())
        self.check_remote_reads(EMBEDDED, counters, first_fills=True)
        self.warm_profile(EMBEDDED, mnt, metrics, {"mount": pid})

    def check_remote_reads(self, system: str, counters: list, *, first_fills: bool) -> None:
        """The worker counters must show one fill per file/block in the first pass, then none."""
        if any(c is None for c in counters):
            self.info["checks"].append(f"{system}: worker counters not reachable; not checked")
            return
        remote = [b["remote_reads"] - a["remote_reads"] for a, b in itertools.pairwise(counters)]
        expected = [self.remote_reads_needed() if first_fills else 0] + [0] * (len(remote) - 1)
        line = f"{system}: remote reads per pass {remote} (expected {expected})"
        self.info["checks"].append(line)
        print(line, flush=True)
        if remote != expected:
            raise RuntimeError(line)

    def cachefs_cluster(self, cleanup) -> None:
        base = self.workdir / "cluster"
        base.mkdir()
        shm = Path(tempfile.mkdtemp(prefix="cachefs-bench-", dir="/dev/shm"))
        cleanup.callback(shutil.rmtree, shm, ignore_errors=True)
        t = time.perf_counter()
        master = master_process(base)
        cleanup.callback(master.stop)
        master.start()
        mem = f"{max(1024, math.ceil(self.info['dataset']['bytes'] * 1.0 / MiB))}M"
        workers = []
        for name in ("w1", "w2"):
            worker = ServiceProcess(
                "worker",
                ["--master", master.address, "--listen", "127.0.0.1:0",
                 "--state", str(base / name), "--mem", mem, "--shm", str(shm / name),
                 "--host-id", name],
                base / f"{name}.log",
            )  # fmt: skip
            cleanup.callback(worker.stop)
            worker.start()
            workers.append(worker)
        self.info["setup"]["cachefs master + 2 workers start"] = time.perf_counter() - t
        t = time.perf_counter()
        added = run_cli(
            "dataset", "add", DATASET, f"s3://{BUCKET}/{PREFIX}", "--master", master.address,
            "-o", f"endpoint_override={self.endpoint}", "-o", "scheme=http", timeout=1800,
        )  # fmt: skip
        if added.returncode != 0:
            raise RuntimeError(f"cachefs dataset add failed: {added.stderr.strip()}")
        self.info["setup"]["cachefs dataset add (metadata sync)"] = time.perf_counter() - t
        mnt = base / "mnt"
        metrics = f"127.0.0.1:{_free_port()}"
        pid = self.mount_cachefs(DATASET, mnt, metrics, "--master", master.address)
        cleanup.callback(cachefs_unmount, mnt)
        pids = {"mount": pid, "master": master.proc.pid}
        pids.update({w.args[-1]: w.proc.pid for w in workers})
        self.meter.add(**{f"cluster {k}": v for k, v in pids.items()})
        cleanup.callback(self.meter.remove, *(f"cluster {k}" for k in pids))
        addresses = [w.address for w in workers]

        def stats() -> dict | None:
            per_worker = [harness.worker_stats_at([a], master.secret) for a in addresses]
            if any(s is None for s in per_worker):
                return None
            return {"remote_reads": sum(s["remote_reads"] for s in per_worker)}

        reader = harness.file_reader(mnt)
        self.metadata(CLUSTER, mnt)
        counters = [stats()]
        self.read(CLUSTER, "cold (empty cache)", REMOTE, reader, drop=True, metrics=metrics)
        counters.append(stats())
        self.check_remote_reads(CLUSTER + " cold", counters, first_fills=True)

        cleaned = run_cli("dataset", "clean", DATASET, "--master", master.address)
        if cleaned.returncode != 0:
            raise RuntimeError(f"cachefs dataset clean failed: {cleaned.stderr.strip()}")
        counters = [stats()]
        row = Row("load", CLUSTER, "`cachefs load` (2 workers)", REMOTE, files=len(self.order))

        def load() -> tuple[float, int]:
            started = time.perf_counter()
            loaded = run_cli("load", DATASET, "--master", master.address, timeout=3600)
            seconds = time.perf_counter() - started
            row.extra["output"] = loaded.stdout.strip()
            if loaded.returncode != 0:
                raise RuntimeError(f"cachefs load failed: {(loaded.stdout + loaded.stderr)[-500:]}")
            return seconds, self.info["dataset"]["bytes"]

        self.measure(row, load, drop=False)
        counters.append(stats())
        self.check_remote_reads(CLUSTER + " load", counters, first_fills=True)
        counters = [counters[-1]]
        self.read(
            CLUSTER, "after `cachefs load` (page cache dropped)", CACHE, reader, drop=True,
            metrics=metrics,
        )  # fmt: skip
        counters.append(stats())
        self.read(
            CLUSTER, "second epoch (page cache)", PAGE_CACHE, reader, drop=False, metrics=metrics
        )
        counters.append(stats())
        if "loader" not in self.args.skip:
            self.loader(CLUSTER, "after load (page cache dropped)", mnt, drop=True)
            counters.append(stats())
        self.check_remote_reads(CLUSTER + " after load", counters, first_fills=False)
        self.warm_profile(CLUSTER, mnt, metrics, pids)

    # ---- peers -----------------------------------------------------------------------------

    def peer_passes(self, system: str, mnt: Path, pid: int, cleanup) -> None:
        self.meter.add(peer=pid)
        cleanup.callback(self.meter.remove, "peer")
        reader = harness.file_reader(mnt)
        self.metadata(system, mnt)
        self.read(system, "cold (empty cache)", REMOTE, reader, drop=True)
        self.read(system, "warm (disk cache, page cache dropped)", CACHE, reader, drop=True)
        self.read(system, "second epoch", PAGE_CACHE, reader, drop=False)

    def peer_placeholders(self, system: str) -> None:
        self.rows.append(Row("metadata", system, "walk + stat"))
        for state, cls in (
            ("cold (empty cache)", REMOTE),
            ("warm (disk cache, page cache dropped)", CACHE),
            ("second epoch", PAGE_CACHE),
        ):
            self.rows.append(Row("read", system, state, cls))

    def peer_unavailable(self, binary: str, system: str) -> bool:
        if binary in self.unavailable:
            self.peer_placeholders(system)
            raise RuntimeError(f"{binary} unavailable: {self.unavailable[binary]}")
        return False

    def rclone(self, cleanup) -> None:
        self.peer_unavailable("rclone", RCLONE)
        base = self.workdir / "rclone"
        mnt, cache = base / "mnt", base / "cache"
        mnt.mkdir(parents=True)
        # rclone's AWS SDK refuses AWS_CA_BUNDLE with its own HTTP transport (and the store
        # is plain HTTP): leave it out.
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env |= {
            "RCLONE_CONFIG": str(base / "rclone.conf"),  # unused: the remote is in the env
            "RCLONE_CONFIG_STORE_TYPE": "s3",
            "RCLONE_CONFIG_STORE_PROVIDER": "Other",
            "RCLONE_CONFIG_STORE_ENDPOINT": f"http://{self.endpoint}",
            "RCLONE_CONFIG_STORE_ACCESS_KEY_ID": harness.AWS_ENV["AWS_ACCESS_KEY_ID"],
            "RCLONE_CONFIG_STORE_SECRET_ACCESS_KEY": harness.AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            "RCLONE_CONFIG_STORE_REGION": harness.AWS_ENV["AWS_DEFAULT_REGION"],
            "RCLONE_CONFIG_STORE_FORCE_PATH_STYLE": "true",
        }
        log = base / "rclone.log"
        cmd = [
            "rclone", "mount", f"store:{BUCKET}/{PREFIX}", str(mnt), "--read-only",
            "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--log-file", str(log),
        ]  # fmt: skip
        self.info["rclone_cmd"] = shlex.join(cmd[:3] + ["MNT"] + cmd[4:8] + ["DIR"])
        self.start_peer(RCLONE, cmd, mnt, log, env, cleanup)

    def s3fs(self, cleanup) -> None:
        self.peer_unavailable("s3fs", S3FS)
        base = self.workdir / "s3fs"
        mnt, cache = base / "mnt", base / "cache"
        mnt.mkdir(parents=True)
        cache.mkdir()
        passwd = base / "passwd"
        passwd.write_text(
            f"{harness.AWS_ENV['AWS_ACCESS_KEY_ID']}:{harness.AWS_ENV['AWS_SECRET_ACCESS_KEY']}\n"
        )
        passwd.chmod(0o600)
        log = base / "s3fs.log"
        cmd = [
            "s3fs", f"{BUCKET}:/{PREFIX}", str(mnt), "-f", "-o", "ro",
            "-o", f"url=http://{self.endpoint}", "-o", "use_path_request_style",
            "-o", f"use_cache={cache}", "-o", f"passwd_file={passwd}",
        ]  # fmt: skip
        shown = ["-o", "url=http://PROXY", "-o", "use_path_request_style", "-o", "use_cache=DIR"]
        shown += ["-o", "passwd_file=F"]
        self.info["s3fs_cmd"] = shlex.join([*cmd[:2], "MNT", *cmd[3:6], *shown])
        self.start_peer(S3FS, cmd, mnt, log, os.environ.copy(), cleanup)

    def start_peer(self, system: str, cmd: list[str], mnt: Path, log: Path, env, cleanup) -> None:
        self.peer_placeholders(system)
        drop_caches()
        t = time.perf_counter()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True,
            )  # fmt: skip
        cleanup.callback(harness.stop, proc)
        cleanup.callback(harness.fuse_unmount, mnt)
        harness.wait_for_mount(mnt, proc, 60, log)
        self.info["setup"][f"{system} mount"] = time.perf_counter() - t
        self.rows = [r for r in self.rows if not (r.system == system and r.seconds is None)]
        self.peer_passes(system, mnt, proc.pid, cleanup)


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def span(row: Row) -> str:
    """min-max files/s over a row's runs."""
    rates = sorted(row.files / seconds for seconds in row.extra.get("runs", [row.seconds]))
    return f"{rates[0]:,.0f}–{rates[-1]:,.0f}"


def rate_cell(row: Row) -> str:
    """files/s of the median run, and the range when the pass ran more than once."""
    if len(row.extra.get("runs", [])) > 1:
        return f"{row.files_s:,.0f} ({span(row)})"
    return f"{row.files_s:,.0f}"


def host_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def one_line(text: str, limit: int = 300) -> str:
    """An error for a table cell: one line, no pipes, the end kept (where the reason is)."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else "…" + text[-limit:]


def cachefs_unmount(mnt: Path) -> None:
    if not os.path.ismount(mnt):
        return
    result = run_cli("umount", str(mnt), timeout=120)
    if os.path.ismount(mnt):
        harness.fuse_unmount(mnt)
        print(f"cachefs umount failed ({result.stderr.strip()}); lazily unmounted", flush=True)


# --- reporting ------------------------------------------------------------------------------


def _best(rows: list[Row], systems, cls: str, kind: str = "read") -> Row | None:
    found = [r for r in rows if r.kind == kind and r.system in systems and r.cls == cls and r.ok]
    return max(found, key=lambda r: r.files_s, default=None)


def _find(rows: list[Row], kind: str, system: str, state_prefix: str = "") -> Row | None:
    for r in rows:
        if r.kind == kind and r.system == system and r.state.startswith(state_prefix) and r.ok:
            return r
    return None


def _cpu(row: Row) -> str:
    if not row.ok:
        return "–"
    reader = row.cpu.get("reader", 0.0)
    store = row.cpu.get("moto", 0.0) + row.cpu.get("proxy", 0.0)
    system = sum(v for k, v in row.cpu.items() if k not in ("reader", "moto", "proxy"))
    rest = max(0.0, row.extra.get("host_cpu", 0.0) - sum(row.cpu.values()))
    return f"{reader:.1f} / {store:.1f} / {system:.1f} / {rest:.1f}"


def read_table(rows: list[Row]) -> str:
    local = _find(rows, "read", LOCAL, "page cache dropped")
    lines = [
        "| system | state | files/s | MiB/s | × local disk (page cache dropped) "
        "| × best peer, same state | store responses "
        "| CPU s: reader / store / system / rest of host |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.kind not in ("read", "load"):
            continue
        if not r.ok:
            lines.append(f"| {r.system} | {r.state} | failed: {r.error} | | | | | |")
            continue
        peer = _best(rows, PEER_SYSTEMS, r.cls)
        vs_local = f"{r.files_s / local.files_s:.2f}" if local else "–"
        vs_peer = f"{r.files_s / peer.files_s:.2f}" if peer else "–"
        lines.append(
            f"| {r.system} | {r.state} | {rate_cell(r)} | {r.mib_s:,.1f} | {vs_local} "
            f"| {vs_peer} | {r.responses:,} | {_cpu(r)} |"
        )
    return "\n".join(lines)


def loader_table(rows: list[Row]) -> str:
    local = _find(rows, "loader", LOCAL, "page cache dropped")
    lines = [
        "| system | state | epoch s | first batch s | files/s | MiB/s "
        "| epoch time × local disk (page cache dropped) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.kind != "loader":
            continue
        if not r.ok:
            lines.append(f"| {r.system} | {r.state} | failed: {r.error} | | | | |")
            continue
        ratio = f"{r.seconds / local.seconds:.2f}" if local else "–"
        lines.append(
            f"| {r.system} | {r.state} | {r.seconds:.1f} | {r.extra.get('first_batch_s', 0):.2f} "
            f"| {rate_cell(r)} | {r.mib_s:,.1f} | {ratio} |"
        )
    return "\n".join(lines)


def metadata_table(rows: list[Row]) -> str:
    lines = [
        "| system | pass | files/s | seconds | store responses |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r.kind != "metadata":
            continue
        if not r.ok:
            lines.append(f"| {r.system} | {r.state} | failed: {r.error} | | |")
            continue
        lines.append(
            f"| {r.system} | {r.state} | {r.files_s:,.0f} | {r.seconds:.2f} | {r.responses:,} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> tuple[str, list[tuple[str, str, bool | None]]]:
    """The issue's targets: (target, measured, met) for the embedded and the cluster mount."""
    local_cold = _find(rows, "read", LOCAL, "page cache dropped")
    local_warm = _find(rows, "read", LOCAL, "warm")
    direct = _find(rows, "read", DIRECT)
    rclone_warm = _find(rows, "read", RCLONE, "warm")
    loader_local = _find(rows, "loader", LOCAL, "page cache dropped")
    checks = []

    def ratio(a: Row | None, b: Row | None, minimum: float, *, time_ratio=False):
        if a is None or b is None:
            return "–", None
        value = a.seconds / b.seconds if time_ratio else a.files_s / b.files_s
        met = value <= minimum if time_ratio else value >= minimum
        return f"{value:.2f}×", met

    specs = [
        ("warm ≥ 0.8× local disk (page cache dropped)", "read", ("warm", "after"), local_cold,
         0.8, False),
        ("warm ≥ 5× rclone warm", "read", ("warm", "after"), rclone_warm, 5.0, False),
        ("second epoch ≥ 0.9× local disk warm", "read", ("second",), local_warm, 0.9, False),
        ("cold ≥ 3× direct remote reads", "read", ("cold",), direct, 3.0, False),
        ("DataLoader epoch (warm) ≤ 1.25× local-disk epoch (page cache dropped)", "loader",
         ("warm", "after"), loader_local, 1.25, True),
    ]  # fmt: skip
    lines = ["| target | cachefs embedded | cachefs cluster |", "|---|---:|---:|"]
    for label, kind, states, ref, bound, time_ratio in specs:
        cells = []
        for system in (EMBEDDED, CLUSTER):
            row = next(
                (r for r in rows if r.kind == kind and r.system == system and r.ok
                 and r.state.startswith(states)),
                None,
            )  # fmt: skip
            text, met = ratio(row, ref, bound, time_ratio=time_ratio)
            mark = "" if met is None else (" met" if met else " **not met**")
            cells.append(text + mark)
            checks.append((f"{system}: {label}", text, met))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines), checks


MOUNT_CPU_KEYS = {EMBEDDED: "cachefs", CLUSTER: "cluster mount"}


def fuse_table(rows: list[Row]) -> str:
    """FUSE requests per file and the mount process's CPU per request, per cachefs pass."""
    lines = [
        "| system | pass | files/s | FUSE requests per file (lookup / open / read / release "
        "/ other) | mount CPU µs per request | mount CPU µs per file (user + sys) "
        "| mount CPU, % of one core |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.kind != "read" or not r.ok or "ops" not in r.extra:
            continue
        ops, files = r.extra["ops"], r.files
        main = ("lookup", "open", "read", "release")
        other = sum(n for op, n in ops.items() if op not in main)
        per_file = " / ".join(f"{ops.get(op, 0) / files:.2f}" for op in main)
        user, system = r.extra["cpu_split"].get(MOUNT_CPU_KEYS[r.system], (0.0, 0.0))
        cpu = user + system
        requests = max(1, sum(ops.values()))
        lines.append(
            f"| {r.system} | {r.state} | {r.files_s:,.0f} | {per_file} / {other / files:.2f} "
            f"| {cpu / requests * 1e6:,.0f} | {cpu / files * 1e6:,.0f} "
            f"({user / files * 1e6:,.0f} + {system / files * 1e6:,.0f}) "
            f"| {100 * cpu / r.seconds:.0f}% |"
        )
    return "\n".join(lines)


def profile_text(info: dict) -> str:
    parts = []
    for system, p in info["profiles"].items():
        files, seconds = p["files"], p["seconds"]
        cpu = {name: sum(v) for name, v in p["cpu"].items()}
        text = (
            f"**{system}**, warm pass (page cache dropped) without the profiler: "
            f"{files / seconds:,.0f} files/s; CPU per file: "
            + ", ".join(
                f"{name} {c / files * 1e6:,.0f} µs ({100 * c / seconds:.0f}% of a core)"
                for name, c in sorted(cpu.items(), key=lambda kv: -kv[1])
            )
            + "."
        )
        profiles = {k: v for k, v in p.get("profiles", {}).items() if v["samples"]}
        if profiles:
            names = list(profiles)
            text += (
                f" Then {plural(p.get('profiled_passes', 1), 'warm pass', 'warm passes')} under "
                "py-spy (100 Hz, native "
                "frames, only samples holding the GIL: where the process's CPU goes, kernel time "
                "inside syscalls included); each sample counted once, for the most specific "
                "part on its stack:\n\n"
                "| part | "
                + " | ".join(f"{n} ({profiles[n]['samples']:,} samples)" for n in names)
                + " |\n|---|"
                + "---:|" * len(names)
                + "\n"
            )
            centers = []
            for n in names:
                for c, _ in profiles[n]["parts"]:
                    if c not in centers:
                        centers.append(c)
            for c in centers:
                cells = []
                for n in names:
                    got = dict(profiles[n]["parts"]).get(c, 0)
                    cells.append(f"{100 * got / profiles[n]['samples']:.0f}%" if got else "–")
                text += f"| {c} | " + " | ".join(cells) + " |\n"
            for n in names:
                top = "; ".join(
                    f"`{f}` {100 * k / profiles[n]['samples']:.0f}%"
                    for f, k in profiles[n]["self"][:6]
                )
                text += f"\nTop self time, {n}: {top}."
        parts.append(text)
    return "\n\n".join(parts)


def chart(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        ("read pass: files/s (log scale)", [r for r in rows if r.kind in ("read", "load")],
         lambda r: r.files_s, True),
        ("DataLoader epoch: seconds", [r for r in rows if r.kind == "loader"],
         lambda r: r.seconds or 0.0, False),
        ("metadata pass (walk + stat): files/s (log scale)",
         [r for r in rows if r.kind == "metadata"], lambda r: r.files_s, True),
    ]  # fmt: skip
    groups = [g for g in groups if g[1]]
    heights = [max(1.5, 0.32 * len(g[1]) + 0.8) for g in groups]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    axes = axes if len(groups) > 1 else [axes]
    for ax, (label, items, value, log) in zip(axes, groups, strict=True):
        items = list(reversed(items))
        names = [f"{r.system}: {r.state}" for r in items]
        values = [value(r) if r.ok else 0.0 for r in items]
        colors = [COLORS.get(r.system, "#333333") for r in items]
        bars = ax.barh(names, [v if v > 0 else float("nan") for v in values], color=colors)
        if log:
            ax.set_xscale("log")
        ax.set_title(label, loc="left", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        for bar, r, v in zip(bars, items, values, strict=True):
            text = f"{v:,.0f}" if v >= 10 else f"{v:.1f}"
            if not r.ok:
                text = "failed"
            x = v if v > 0 else (ax.get_xlim()[0] if log else 0)
            ax.text(x, bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=7)
        ax.margins(x=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(bench: Bench, args, command: str, total_s: float) -> tuple[str, bool]:
    rows, info = bench.rows, bench.info
    code_now = harness.git_state(REPO)
    code_note = (
        f" **The code changed during the run** (at the end: {code_now}); processes started "
        "after the change ran the newer code."
        if code_now != info["git"]
        else ""
    )
    ds = info["dataset"]
    target_text, checks = targets(rows)
    setup = ", ".join(f"{k} {v:.1f} s" for k, v in info["setup"].items())
    failures = "".join(f"\n- **{name} failed**: {why}" for name, why in bench.failures.items())
    peer_cmds = "; ".join(f"`{info[k]}`" for k in ("rclone_cmd", "s3fs_cmd") if k in info)
    note = (
        f"Measured {info['started_at']} on {harness.machine()}, {info['git']}, with "
        f"`{command}` ({total_s / 60:.1f} min in all; 1-minute load average "
        f"{info['load'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, so other "
        f'work on the host shows in the "rest of host" CPU column).{code_note}\n\n'
        f"Dataset: {ds['files']:,} rawframes-like files in {ds['dirs']:,} directories, "
        f"{ds['bytes'] / MiB:,.0f} MiB, median {ds['median'] / 1000:.0f} KB, "
        f"{ds['min'] / 1000:.1f} KB to {ds['max'] / MiB:.1f} MiB ({ds['above_4mib']} above "
        f"4 MiB), seeded (benchmarks/dataset.py). Store: moto (S3 protocol) on 127.0.0.1 "
        f"behind a proxy holding each response {args.delay_ms:g} ms; moto, the proxy, the "
        f"readers and the system under test share the {os.cpu_count()} cores, so the store is "
        f"CPU-bound too. Read pass: {args.threads} threads, every file whole, one seeded "
        f'shuffled order, size + xxh3_64 of every file checked; "page cache dropped" = '
        f"`echo 3 > /proc/sys/vm/drop_caches` before the pass (cachefs keeps its cache in "
        f"RAM (/dev/shm), which that does not drop; rclone and s3fs keep theirs on the local "
        f"disk). × best peer compares with the faster of rclone and s3fs in the same state "
        f"(remote / cache with the page cache dropped / second epoch). Passes that leave the "
        f"state as they found it (all but the cold ones, `cachefs load` and the first walks) "
        f"ran up to {args.repeat} times, as long as that fitted in {args.repeat_budget:g} s: "
        f"files/s is the median run, the range in parentheses. Store responses = HTTP "
        f"responses through the proxy during the row. CPU: seconds used by the reader, the "
        f"store (moto + proxy) and the system (mount process, master, workers, rclone or "
        f"s3fs) during the row, and by everything else on the host (kernel threads, other "
        f"programs: a large value means the row was disturbed). Setup: {setup}. Peers: {peer_cmds}."
        f"{failures}"
    )
    checked = "\n".join(f"- {line}" for line in info["checks"])
    body = [
        note,
        f"![read passes, DataLoader epochs and metadata passes]({Path(args.chart).name})",
        "### Read pass\n\n" + read_table(rows),
        "### DataLoader epoch (num_workers "
        f"{args.loader_workers}, batch {args.batch}, contents only, no model)\n\n"
        + loader_table(rows),
        "### Metadata pass (first walk after mounting, page cache dropped)\n\n"
        + metadata_table(rows),
        "### Targets (issue 5)\n\n" + target_text,
        "### Checks\n\nEvery read pass, DataLoader epoch and metadata pass above verified every "
        "file against the manifest. Worker counters:\n\n" + (checked or "- none"),
    ]
    body.append(
        "### FUSE requests and the mount process's CPU per pass\n\nRequests counted by the "
        "mount's Prometheus counters (`cachefs_fuse_ops_total`), CPU by psutil; the embedded "
        "mount process also runs the master and the worker.\n\n" + fuse_table(rows)
    )
    if info["profiles"]:
        body.append("### Profile of the warm path\n\n" + profile_text(info))
    met_all = all(met for _, _, met in checks if met is not None)
    return "\n\n".join(body), met_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 files (default 20,000)")
    add_shape_arguments(parser)
    parser.add_argument("--threads", type=int, default=8, help="reader threads")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="held per store response")
    parser.add_argument("--loader-workers", type=int, default=4, help="DataLoader num_workers")
    parser.add_argument("--batch", type=int, default=32, help="DataLoader batch size")
    parser.add_argument("--skip", nargs="*", default=[], choices=[*SECTION_SYSTEMS, "loader"])
    parser.add_argument("--no-profile", action="store_true", help="no py-spy passes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each warm pass, at most")
    parser.add_argument(
        "--repeat-budget", type=float, default=15.0, help="seconds the runs of one pass may take"
    )
    parser.add_argument("--keep-profiles", type=Path, help="copy py-spy's raw profiles here")
    parser.add_argument(
        "--profile-seconds", type=float, help="warm passes under py-spy, at least (10; 5 quick)"
    )
    parser.add_argument("--data-dir", type=Path, help="keep/reuse the generated dataset here")
    parser.add_argument("--workdir", type=Path, help="parent of the temp dir (default /tmp)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.md")
    parser.add_argument("--no-results", action="store_true", help="only print")
    parser.add_argument("--chart", type=Path, help="default benchmarks/results[-quick].png")
    parser.add_argument(
        "--stop-on-failure", dest="keep_going", action="store_false",
        help="abort when a system fails (default: report it as a failed row and go on)",
    )  # fmt: skip
    args = parser.parse_args()
    args.files = args.files or (1000 if args.quick else Shape().files)
    if args.profile_seconds is None:
        args.profile_seconds = 5.0 if args.quick else 10.0
    args.chart = args.chart or REPO / "benchmarks" / (
        "results-quick.png" if args.quick else "results.png"
    )
    if os.geteuid() != 0:
        parser.error("needs root: FUSE mounts and /proc/sys/vm/drop_caches")
    command = shlex.join(["python", "benchmarks/run_all.py", *sys.argv[1:]])

    started = time.perf_counter()
    bench_info = {
        "started_at": time.strftime("%Y-%m-%d %H:%M"),
        "git": harness.git_state(REPO),
        "load": os.getloadavg(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-all-", dir=args.workdir))
    bench = Bench(args, workdir)
    bench.info.update(bench_info)
    try:
        bench.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total_s = time.perf_counter() - started
    text, met_all = report(bench, args, command, total_s)
    print()
    print(text)
    print(f"\ntotal {total_s:.0f} s")
    title = "All systems, --quick (run_all.py)" if args.quick else "All systems (run_all.py)"
    try:
        chart(bench.rows, args.chart, f"{command} — {time.strftime('%Y-%m-%d')}")
        print(f"chart: {args.chart}")
    except ImportError as exc:
        print(f"no chart: {exc} (pip install -e .[bench])")
    if not args.no_results:
        replace_section(args.results, title, text)
        print(f"results: {args.results} (section {title!r})")
    cachefs_failed = [s for s in bench.failures if s in ("embedded", "cluster")]
    if cachefs_failed:
        sys.exit(f"cachefs failed in: {', '.join(cachefs_failed)}")


if __name__ == "__main__":
    main()
