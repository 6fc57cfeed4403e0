"""Shared pieces of the read benchmarks: the remote store, verified readers, mounts, profiling.

- the store: a moto S3 server on 127.0.0.1 (`start_store`, `upload`); the benchmarks put
  tests/store_proxy.py (a subprocess) in front of it for a remote store's latency and counts;
- readers that verify every byte against the dataset manifest (`read_pass`: N threads over one
  shuffled order; `metadata_pass`: walk + stat); a mismatch raises `ContentError`;
- `CpuMeter` (CPU seconds per process during a block), `drop_caches`, FUSE unmounts, py-spy
  (`profiled`, `summarize_profile`), apt installs of the peers (`ensure_tools`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dataset import Manifest  # noqa: E402
from tests.conftest import MotoServer, _start_moto  # noqa: E402

MiB = 1 << 20
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class ContentError(AssertionError):
    """A reader got bytes (or a listing) that differ from the manifest: the run is wrong."""


# --- the remote store ---------------------------------------------------------------------------


def start_store(log_path: Path) -> tuple[subprocess.Popen, MotoServer]:
    """A moto S3 server process on a free loopback port (credentials from AWS_ENV)."""
    os.environ.update(AWS_ENV)  # boto3, pyarrow, the mount processes and rclone read them
    proc, endpoint = _start_moto(log_path)
    return proc, MotoServer(endpoint)


def upload(
    server: MotoServer, bucket: str, prefix: str, root: Path, manifest: Manifest, threads: int
) -> None:
    client = server.client  # boto3 clients are thread-safe

    def put(rel: str) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=(root / rel).read_bytes())

    server.create_bucket(bucket)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, manifest))


def pyarrow_s3(endpoint: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        access_key=AWS_ENV["AWS_ACCESS_KEY_ID"],
        secret_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region=AWS_ENV["AWS_DEFAULT_REGION"],
        endpoint_override=endpoint,
        scheme="http",
    )


# --- readers ------------------------------------------------------------------------------------


def check(rel: str, data: bytes, manifest: Manifest) -> None:
    size, digest = manifest[rel]
    if len(data) != size or xxhash.xxh3_64_intdigest(data) != digest:
        raise ContentError(f"{rel}: wrong content ({len(data)} bytes, expected {size})")


def read_pass(read: Callable[[str], bytes], order: list[str], manifest: Manifest, threads: int):
    """Reads every file of `order` with `threads` threads taking the next file in order.

    Returns (seconds, bytes); raises ContentError if any file had the wrong content.
    """
    counter = itertools.count()  # next() on it is atomic under the GIL

    def reader() -> int:
        total = 0
        while (i := next(counter)) < len(order):
            rel = order[i]
            data = read(rel)
            check(rel, data, manifest)
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


def unbuffered_file_reader(root: Path) -> Callable[[str], bytes]:
    """open(..., buffering=0) read until EOF: the kernel sees exactly what the reader asks."""

    def read(rel: str) -> bytes:
        with open(root / rel, "rb", buffering=0) as f:
            return f.readall()

    return read


def s3_reader(endpoint: str, bucket: str, prefix: str) -> Callable[[str], bytes]:
    """pyarrow reads of the store: a HEAD and a GET per file (what a cachefs worker does)."""
    fs = pyarrow_s3(endpoint)

    def read(rel: str) -> bytes:
        with fs.open_input_stream(f"{bucket}/{prefix}/{rel}") as f:
            return f.read()

    return read


def _check_listing(seen: dict[str, int], manifest: Manifest) -> None:
    if seen.keys() != manifest.keys():
        missing, extra = manifest.keys() - seen.keys(), seen.keys() - manifest.keys()
        raise ContentError(
            f"listing differs: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
        )
    wrong = [rel for rel, size in seen.items() if size != manifest[rel][0]]
    if wrong:
        raise ContentError(f"{len(wrong)} files with the wrong size, e.g. {wrong[:3]}")


def metadata_pass(root: Path, manifest: Manifest) -> float:
    """os.walk + os.stat of every file, one thread; checks names and sizes. Returns seconds."""
    started = time.perf_counter()
    seen = {}
    base = len(str(root)) + 1
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            seen[path[base:]] = os.stat(path).st_size
    seconds = time.perf_counter() - started
    _check_listing(seen, manifest)
    return seconds


def s3_metadata_pass(endpoint: str, bucket: str, prefix: str, manifest: Manifest) -> float:
    """A recursive listing of the prefix (ListObjectsV2 pages); checks names and sizes."""
    import pyarrow.fs as pafs

    fs = pyarrow_s3(endpoint)
    started = time.perf_counter()
    infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True))
    seconds = time.perf_counter() - started
    base = len(f"{bucket}/{prefix}/")
    seen = {i.path[base:]: i.size for i in infos if i.type == pafs.FileType.File}
    _check_listing(seen, manifest)
    return seconds


def dataloader_epoch(
    root: Path, manifest_path: Path, workers: int, batch: int, seed: int, unbuffered: bool = False
) -> dict:
    """One checked DataLoader epoch over `root` (benchmarks/torch_epoch.py in a subprocess):
    its JSON report (seconds, bytes, first_batch_s)."""
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("torch_epoch.py")), str(root),
         str(manifest_path), "--workers", str(workers), "--batch", str(batch),
         "--seed", str(seed), *(["--unbuffered"] if unbuffered else [])],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if result.returncode == 3:
        raise ContentError(f"DataLoader epoch on {root}: {result.stderr.strip()}")
    if result.returncode != 0:
        raise RuntimeError(f"DataLoader epoch on {root} failed: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def drop_caches() -> None:
    """Page cache, dentries and inodes out (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class FuseRequestTrace:
    """Counts the requests the kernel sends to one FUSE connection (tracepoint
    fuse:fuse_request_send), in a tracing instance of its own: other tracing on the machine is
    untouched, and the filter on the connection leaves out other FUSE mounts (a test suite's).

    `unavailable` says why nothing can be counted (no tracefs, no fuse events, not root);
    then start/stop do nothing and stop returns None.
    """

    ROOT = Path("/sys/kernel/tracing")
    BUFFER_KB = 65536  # per CPU: far more than a pass of 20,000 files sends

    def __init__(self, name: str):
        self.unavailable: str | None = None
        self.instance: Path | None = None
        self._mounted_tracefs = False
        try:
            if not (self.ROOT / "events").exists():
                subprocess.run(
                    ["mount", "-t", "tracefs", "nodev", str(self.ROOT)],
                    capture_output=True, check=True,
                )  # fmt: skip
                self._mounted_tracefs = True
            if not (self.ROOT / "events" / "fuse" / "fuse_request_send").exists():
                raise OSError("the kernel has no fuse:fuse_request_send tracepoint")
            self.instance = self.ROOT / "instances" / name
            self.instance.mkdir()
            (self.instance / "buffer_size_kb").write_text(f"{self.BUFFER_KB}\n")
        except (OSError, subprocess.CalledProcessError) as exc:
            self.unavailable = f"tracefs unavailable: {exc}"
            self.close()

    @property
    def _event(self) -> Path:
        return self.instance / "events" / "fuse" / "fuse_request_send"

    def start(self, mountpoint: Path) -> None:
        if self.unavailable:
            return
        dev = os.stat(mountpoint).st_dev
        connection = (os.major(dev) << 20) | os.minor(dev)  # the kernel's dev_t encoding
        (self._event / "filter").write_text(f"connection == {connection}\n")
        (self.instance / "trace").write_text("")  # clears the buffer and its overrun counters
        (self._event / "enable").write_text("1\n")

    def stop(self) -> Counter | None:
        """Requests by opcode ("READ", "LOOKUP", ...) since start; raises if any were lost."""
        if self.unavailable:
            return None
        (self._event / "enable").write_text("0\n")
        text = (self.instance / "trace").read_text()
        written = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        lost = sum(
            int(n)
            for stats in self.instance.glob("per_cpu/cpu*/stats")
            for n in re.findall(r"^(?:overrun|commit overrun|dropped events): (\d+)$",
                                stats.read_text(), re.M)
        )  # fmt: skip
        if lost or (written and written.group(1) != written.group(2)):
            raise RuntimeError(f"the FUSE request trace lost events ({lost}; raise BUFFER_KB)")
        return Counter(op.removeprefix("FUSE_") for op in re.findall(r"opcode \d+ \((\w+)\)", text))

    def close(self) -> None:
        if self.instance is not None and self.instance.exists():
            with contextlib.suppress(OSError):
                (self._event / "enable").write_text("0\n")
            with contextlib.suppress(OSError):
                self.instance.rmdir()
        if self._mounted_tracefs:
            subprocess.run(["umount", str(self.ROOT)], capture_output=True, check=False)
            self._mounted_tracefs = False


# --- processes ----------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) used by this process and other processes during a block."""

    def __init__(self, **pids: int | None):
        self.procs = {"reader": psutil.Process()}
        self.add(**pids)

    def add(self, **pids: int | None) -> None:
        self.procs.update({name: psutil.Process(pid) for name, pid in pids.items() if pid})

    def remove(self, *names: str) -> None:
        for name in names:
            self.procs.pop(name, None)

    def _now(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, proc in self.procs.items():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            out[name] = (times.user, times.system)
        return out

    @contextlib.contextmanager
    def measure(self, into: dict, split: dict | None = None):
        """Fills `into` with name -> CPU s; `split` (optional) with name -> (user s, sys s)."""
        before = self._now()
        yield
        after = self._now()
        for name in before.keys() & after.keys():
            user = after[name][0] - before[name][0]
            system = after[name][1] - before[name][1]
            into[name] = user + system
            if split is not None:
                split[name] = (user, system)


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fuse_unmount(mountpoint: Path) -> None:
    """fusermount3 -u; lazily (-uz) if the mount is busy."""
    if not os.path.ismount(mountpoint):
        return
    for flags in ("-u", "-uz"):
        subprocess.run(["fusermount3", flags, str(mountpoint)], capture_output=True, check=False)
        if not os.path.ismount(mountpoint):
            return


def wait_for_mount(mountpoint: Path, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Waits until `mountpoint` is a mount point; fails with the log tail if `proc` exits."""
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip()[-800:] if log.exists() else ""
            raise RuntimeError(f"exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not mounted after {timeout:.0f} s")
        time.sleep(0.05)  # the kernel's mount table has no event to wait on


def mount_pid(mountpoint: Path) -> int:
    """The pid of the cachefs process serving `mountpoint` (its pid file is a JSON record that
    `cachefs umount` checks: pid, start time, and for embedded mounts master and secret)."""
    from cachefs.fuse.mount import pid_file
    from cachefs.runtime import read_pid_file

    record = read_pid_file(pid_file(mountpoint))
    if record is None:
        raise RuntimeError(f"no live cachefs process recorded for {mountpoint}")
    return record["pid"]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def listening_ports(pid: int) -> list[int]:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN})


def worker_stats_at(addresses: list[str], secret: bytes | None = None) -> dict | None:
    """The `stats` of the first address that answers like a cachefs worker (else None).

    Workers authenticate their callers: `secret` is the cluster's (a refused handshake
    raises, rather than passing for "not a worker")."""
    import trio

    from cachefs.errors import AuthenticationFailed, CacheFsError
    from cachefs.rpc import RpcClient

    async def ask() -> dict | None:
        for address in addresses:
            try:
                async with RpcClient(address, secret=secret, timeout=10) as client:
                    reply = await client.call("stats")
            except AuthenticationFailed:
                raise
            except CacheFsError:
                continue  # e.g. a master: no such method
            if isinstance(reply, dict) and "remote_reads" in reply:
                return reply
        return None

    return trio.run(ask)


def published_secret(ports: list[int]) -> bytes | None:
    """The secret a master of this user on this host published for one of `ports`, as
    `cachefs status --master 127.0.0.1:PORT` finds it (an embedded mount's master does)."""
    from cachefs.credentials import client_secret

    for port in ports:
        secret = client_secret(None, ("127.0.0.1", port))
        if secret is not None:
            return secret
    return None


_embedded_worker: dict[int, tuple[str, bytes | None]] = {}


def embedded_worker_stats(pid: int, skip_ports: set[int] = frozenset()) -> dict | None:
    """The embedded worker's `stats` (found among the mount process's listening ports; the
    secret is the one its embedded master published, which the worker shares)."""
    known = _embedded_worker.get(pid)
    if known is not None:
        return worker_stats_at([known[0]], known[1])
    ports = [port for port in listening_ports(pid) if port not in skip_ports]
    secret = published_secret(ports)
    for port in ports:
        stats = worker_stats_at([f"127.0.0.1:{port}"], secret)
        if stats is not None:
            _embedded_worker[pid] = (f"127.0.0.1:{port}", secret)
            return stats
    return None


def scrape_fuse_ops(metrics_address: str) -> Counter:
    """cachefs_fuse_ops_total by op from a mount's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    ops = Counter()
    for op, value in re.findall(r'^cachefs_fuse_ops_total\{op="(\w+)"\} (\S+)$', text, re.M):
        ops[op] = int(float(value))
    return ops


# --- profiling ----------------------------------------------------------------------------------


@contextlib.contextmanager
def profiled(
    pids: dict[str, int], out_dir: Path, label: str, rate: int = 100, native: bool = True
) -> Iterator[dict]:
    """py-spy records each pid while the block runs: collapsed stacks of the thread holding the
    GIL (where the process's Python CPU goes; waits in epoll or locks release it), with native
    frames (so time inside pyfuse3's Cython and libfuse shows).

    Yields {name: profile path}. Sampling pauses the target briefly, so the block is slower
    than an unprofiled one: profiled passes are never the ones in the tables.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, paths = [], {}
    try:
        for name, pid in pids.items():
            out = out_dir / f"{label}-{name}.txt"
            proc = subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
                + ["--rate", str(rate), "--gil"]
                + (["--native"] if native else []),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append(proc)
            line = proc.stdout.readline()  # "py-spy> Sampling process ..." once attached
            if "Sampling" not in line:
                raise RuntimeError(f"py-spy did not start: {line.strip()}")
            paths[name] = out
        yield paths
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _any(frames: list[str], *needles: str) -> bool:
    return any(n in f for f in frames for n in needles)


def _starts(frames: list[str], *prefixes: str) -> bool:
    return any(f.startswith(prefixes) for f in frames)


#: Where a sample's time goes: (part, test on the stack's frames, each "function (file:line)").
#: Each sample counts for the first part that matches, so the shares add up to 100%; the order
#: puts the specific (a deadline's enter/exit, a metric, the store) before what calls it.
PARTS: list[tuple[str, Callable[[list[str]], bool]]] = [
    ("FUSE replies: fuse_reply_* → writev(/dev/fuse), with the GIL held",
     lambda fs: _starts(fs, "fuse_reply_")),
    ("pyfuse3 request loop: wait, trio Lock, read(/dev/fuse)",
     lambda fs: _any(fs, ".pyx")
     and _starts(fs, "wait_readable (", "_LockImpl.", "fuse_session_receive_buf", "read (libc")
     and not _any(fs, "cachefs/rpc.py")),
    ("per-op deadlines: trio fail_after / move_on_after (enter + exit)",
     lambda fs: _starts(fs, "fail_after (", "move_on_after (", "move_on_at (")),
    ("Prometheus counters + histograms", lambda fs: _any(fs, "prometheus_client")),
    ("worker cache: store.get (index, xxh3 checksum, copy out of the mmap)",
     lambda fs: _any(fs, "worker/store.py", "worker/tier.py")),
    ("worker read path (worker/service.py)", lambda fs: _any(fs, "worker/service.py")),
    ("master (namespace lookups)",
     lambda fs: any("master/" in f and "cachefs/" not in f for f in fs)),
    ("RPC layer: cachefs/rpc.py + protocol.py (LocalClient in embedded mode)",
     lambda fs: _any(fs, "cachefs/rpc.py", "cachefs/protocol.py")),
    ("cachefs FUSE handlers (fuse/operations.py, vfs.py, reader.py)",
     lambda fs: _any(fs, "fuse/operations.py", "fuse/vfs.py", "fuse/reader.py")),
]  # fmt: skip
REST = "rest: trio scheduler, task switches, GC"


def _frames(stack: str) -> list[str]:
    # raw py-spy lines: "frame;frame;...;leaf COUNT", frames "function (file:line)"
    return [f for f in stack.split(";") if "(" in f]


def summarize_profile(path: Path, top: int = 10) -> dict:
    """Samples per part (see PARTS; they add up to all samples) and the top self functions."""
    total = 0
    parts: Counter = Counter()
    by_self: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = _frames(stack)
        if frames:
            by_self[_short(frames[-1])] += n
        part = next((name for name, test in PARTS if test(frames)), REST)
        parts[part] += n
    order = [name for name, _ in PARTS] + [REST]
    return {
        "samples": total,
        "parts": [(name, parts[name]) for name in order if parts[name]],
        "self": by_self.most_common(top),
    }


def _short(frame: str) -> str:
    """'read (/work/.../fuse/reader.py:97)' -> 'read (fuse/reader.py:97)'."""
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame
    func, where = match.groups()
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{func} ({where})"


# --- the machine and the peers ------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        distro = Path("/etc/debian_version").read_text().strip()
        distro = f"Debian {distro}"
    except OSError:
        distro = platform.platform()
    mem = psutil.virtual_memory().total / (1 << 30)
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {distro}, Linux "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def git_state(repo: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        ).stdout.rstrip("\n")

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [
        line[3:]
        for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        if not line[3:].startswith("benchmarks/") and line[3:] != "pyproject.toml"
    ]
    if dirty:
        return f"commit {commit} plus uncommitted changes to {', '.join(sorted(dirty))}"
    return f"commit {commit}"


def ensure_tools(tools: dict[str, str]) -> dict[str, str]:
    """Installs missing binaries ({binary: Debian package}) with apt-get.

    Returns {binary: why it is unavailable} for those still missing.
    """
    missing = {binary: pkg for binary, pkg in tools.items() if not shutil.which(binary)}
    if not missing:
        return {}
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(sorted(set(missing.values())))} with apt-get ...", flush=True)
    steps = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing.values()]]
    error = ""
    for step in steps:
        if os.geteuid() != 0:
            step = ["sudo", "-n", *step]
        try:
            result = subprocess.run(step, capture_output=True, text=True, env=env, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = f"{' '.join(step)}: {exc}"
            break
        if result.returncode != 0:
            error = f"{' '.join(step)} failed: {result.stderr.strip()[-300:]}"
            break
    return {
        binary: error or f"{pkg} installed but {binary} not found"
        for binary, pkg in missing.items()
        if not shutil.which(binary)
    }


def ensure_bench_extra(repo: Path) -> str | None:
    """Installs the `[bench]` extra's packages (pyproject.toml) with pip if one is missing.

    Returns why they are still unavailable, or None.
    """
    import importlib.util
    import tomllib

    def missing() -> list[str]:
        out = []
        if importlib.util.find_spec("matplotlib") is None:
            out.append("matplotlib")
        if not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
            out.append("py-spy")
        return out

    if not missing():
        return None
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    wanted = project["optional-dependencies"]["bench"]
    print(f"installing the [bench] extra: {' '.join(wanted)} ...", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", *wanted], capture_output=True, text=True
    )
    importlib.invalidate_caches()
    still = missing()
    if still:
        return f"{', '.join(still)} missing (pip: {result.stderr.strip()[-300:]})"
    return None

