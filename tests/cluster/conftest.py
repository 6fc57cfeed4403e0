"""A cachefs cluster spread over network namespaces, for multi-host fault tests.

Hosts (see tests/cluster/netns.py): `store` (tests/store_proxy.py listening on the store's
address in front of the session's moto server), `master`, workers `w1`..`w3` (more on demand),
and FUSE clients `c1`, `c2`. Every cachefs process runs in its host via nsenter and listens on
its host's address, so all cachefs traffic crosses the veths and the bridge, where a test can
cut it.

Fixtures:
- `frames` (module): a bucket with a small dataset (300 files of up to 16 KiB) and its digests;
- `cluster`: `cluster(workers=..., worker_args=...)` starts a cluster (master and workers up and
  registered) and tears everything down at the end of the test, even a failed one: unmounts,
  stops processes, deletes the namespaces;
- `tmpfs`: `tmpfs(size)` mounts a small tmpfs (a disk that fills up) for the test.
A session finalizer deletes any namespace this run made and left behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.netns import Host, Network, cleanup_run
from tests.fuse.conftest import make_files
from tests.procs import ServiceProcess, cachefs_cmd, run_cli, wait_for_line
from tests.store_proxy import StoreProxy

MASTER_PORT = 19470
WORKER_PORT = 19471
STORE_PORT = 9000
WORKERS = ("w1", "w2", "w3")
CLIENTS = ("c1", "c2")
#: The master drops a worker after this many seconds without heartbeats (default 10; shorter
#: keeps the suite fast, still 4 heartbeats long).
LIVENESS = 5.0


# --- session safety ------------------------------------------------------------------------


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and FUSE mounts need root"
    for tool in ("ip", "nsenter", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture(scope="session", autouse=True)
def _leftover_namespaces():
    """Skips without root or tools; at the end deletes namespaces this run left behind."""
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    atexit.register(cleanup_run)  # also after an interrupted run
    try:
        yield
    finally:
        leftovers = cleanup_run()
        if leftovers:
            print(f"deleted leftover namespaces: {leftovers}")


# --- the store -----------------------------------------------------------------------------


@dataclass
class Frames:
    """A dataset in the store: s3://bucket/data, and the files' sha256 by relative path."""

    bucket: str
    source: Path
    digests: dict[str, str]
    prefix: str = "data"

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def data(self, rel: str) -> bytes:
        return (self.source / rel).read_bytes()

    @property
    def nonempty(self) -> list[str]:
        return [rel for rel in sorted(self.digests) if (self.source / rel).stat().st_size]


def upload_frames(moto_server, source: Path, digests: dict[str, str]) -> Frames:
    bucket = moto_server.create_bucket()
    client = moto_server.client

    def put(rel: str) -> None:
        client.put_object(Bucket=bucket, Key=f"data/{rel}", Body=(source / rel).read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, digests))
    return Frames(bucket, source, digests)


@pytest.fixture(scope="module")
def frames(moto_server, tmp_path_factory) -> Frames:
    """300 files of 0-16 KiB in directories of 10, uploaded once per module."""
    source = tmp_path_factory.mktemp("frames")
    return upload_frames(moto_server, source, make_files(source, 300, max_size=16_384, seed=21))


# --- processes in hosts --------------------------------------------------------------------


class NsService(ServiceProcess):
    """A cachefs server process in a host; can be killed, paused, resumed and restarted."""

    def __init__(self, host: Host, kind: str, args: list[str], log_path: Path):
        super().__init__(kind, args, log_path)
        self.host = host
        self.paused = False

    def launch(self) -> None:
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = self.host.popen(
            cachefs_cmd("--log-level", "INFO", self.kind, *self.args),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> str:
        try:
            match = wait_for_line(self.proc, rf"cachefs {self.kind} listening on (\S+)", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{self.host.name}: {exc}\nlog:\n{self.log()[-3000:]}") from None
        self.address = match.group(1)
        return self.address

    def start(self) -> str:
        self.launch()
        return self.wait_ready()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.paused and self.running:
            self.resume()  # a stopped process would never act on SIGTERM
        self.paused = False
        super().stop(sig)


class Cluster:
    """One master, workers and FUSE clients, each on its own host."""

    def __init__(
        self,
        tmp_path: Path,
        moto_endpoint: str | None,
        *,
        workers: tuple[str, ...] = WORKERS,
        worker_args: dict[str, list[str]] | None = None,
        clients: tuple[str, ...] = CLIENTS,
        liveness: float = LIVENESS,
        net: Network | None = None,
    ):
        """`net`: hosts to reuse (a benchmark's clusters one after another on the same store
        host); the caller closes it. Otherwise the cluster makes its own and closes it."""
        self.tmp = tmp_path
        self.liveness = liveness
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.worker_args = dict(worker_args or {})
        self.mounts: list[Path] = []
        self.workers: dict[str, NsService] = {}
        self.own_net = net is None
        self.net = net or Network()
        try:
            for name in ("store", "master", *workers, *clients):
                if name not in self.net.hosts:
                    self.net.add_host(name)
            # The store host: its listening socket is made in the store's namespace, so workers
            # and clients reach the store over the network; the proxy's own connections go to
            # moto from the test process's namespace. Without moto (benchmarks/seed_scenario.py)
            # the caller puts its own store's relays on that host.
            store = self.net["store"]
            self.store = moto_endpoint and StoreProxy(
                moto_endpoint, host=store.ip, port=STORE_PORT, bind=store.bind_here
            )
            master = self.net["master"]
            self.master_address = f"{master.ip}:{MASTER_PORT}"
            self.master = NsService(
                master, "master",
                ["--listen", self.master_address, "--state", str(tmp_path / "master-state"),
                 "--liveness", str(liveness)],
                tmp_path / "master.log",
            )  # fmt: skip
            for name in workers:
                self.workers[name] = self._worker(name)
        except BaseException:
            self.close()
            raise

    def _worker(self, name: str) -> NsService:
        host = self.net.hosts.get(name) or self.net.add_host(name)
        base = self.tmp / name
        address = f"{host.ip}:{WORKER_PORT}"
        extra = self.worker_args.get(name, [])
        mem = [] if "--mem" in extra else ["--mem", "64M"]
        args = [
            "--master", self.master_address, "--listen", address, "--advertise", address,
            "--state", str(base / "state"), "--shm", str(base / "shm"), "--host-id", name,
            "--secret-file", str(self.secret_file), *mem, *extra,
        ]  # fmt: skip
        return NsService(host, "worker", args, self.tmp / f"{name}.log")

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> Cluster:
        self.master.start()
        for worker in self.workers.values():  # workers start in parallel
            worker.launch()
        for worker in self.workers.values():
            worker.wait_ready()
        self.wait_workers(set(self.workers))
        return self

    def add_worker(self, name: str, *extra: str) -> NsService:
        """A new worker host joins (scale out); returns once the master lists it."""
        if extra:
            self.worker_args[name] = list(extra)
        worker = self.workers[name] = self._worker(name)
        worker.start()
        return worker

    def close(self) -> None:
        stuck = []
        for mountpoint in self.mounts:
            if os.path.ismount(mountpoint):
                result = run_cli("umount", str(mountpoint), timeout=60)
                if os.path.ismount(mountpoint):  # busy (a failed test's readers): detach it
                    print(f"umount {mountpoint}: {result.stderr.strip()}; detaching it")
                    subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
                    if os.path.ismount(mountpoint):
                        stuck.append(str(mountpoint))
        for host in getattr(self.net, "hosts", {}).values():
            if host.is_cut:
                host.heal()
        services = [s for s in [*self.workers.values(), getattr(self, "master", None)] if s]
        for service in services:  # all at once, then wait for each
            if service.running:
                if service.paused:
                    service.resume()
                service.proc.send_signal(signal.SIGTERM)
        for service in services:
            service.stop()
        if getattr(self, "store", None):
            self.store.stop()
        if self.own_net:
            self.net.close()  # also kills the mount processes, in the clients' namespaces
        assert not stuck, f"still mounted: {stuck}"

    # ---- commands ------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True):
        """`cachefs ARGS --master ADDR`, run on the master's host."""
        result = self.net["master"].run(
            cachefs_cmd(*args, "--master", self.master_address), timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"cachefs {' '.join(args)}: {result.stderr}"
        return result

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def worker_stats(self) -> dict[str, dict]:
        """host id -> the worker's live stats, for the workers the master lists."""
        return {w["host"]: w["stats"] for w in self.status()["workers"]}

    def wait_until(self, what: str, check, timeout: float = 60.0, interval: float = 0.2):
        """Polls `check()` (the cluster's state, seen from outside) until it is truthy."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)  # polling another process's state: no event to wait on
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")

    def wait_workers(self, expected: set[str], timeout: float = 60.0) -> dict[str, dict]:
        """Until the master's live workers are exactly `expected` (host ids); returns their
        stats. A `cachefs status` that fails counts as "not yet" (its error is reported if the
        wait times out): this waits for membership; test_status_answers_while_a_worker_is_down
        checks that status itself answers while a dead worker is listed."""
        last = {"listed": None, "failure": None}

        def listed():
            result = self.cli("status", "--json", check=False)
            if result.returncode != 0:
                last["failure"] = result.stderr.strip()
                return None
            stats = {w["host"]: w["stats"] for w in json.loads(result.stdout)["workers"]}
            last["listed"] = sorted(stats)
            return stats if set(stats) == expected else None

        try:
            return self.wait_until(f"workers {sorted(expected)}", listed, timeout)
        except AssertionError:
            raise AssertionError(
                f"the master did not list workers {sorted(expected)} in {timeout:.0f}s: {last}"
            ) from None

    def add_dataset(self, name: str, frames: Frames) -> None:
        options = [f"-o{k}={v}" for k, v in self.store.options.items()]
        self.cli("dataset", "add", name, frames.uri(), *options)

    def mount(self, client: str, dataset: str, *args: str) -> Path:
        """`cachefs mount DATASET MNT --master ADDR` run on host `client`; returns MNT.

        Two serving processes unless `args` say otherwise: the faults here also hit mounts
        whose requests any of several processes answers (fuse/serving.py).
        """
        if "--procs" not in args:
            args = ("--procs", "2", *args)
        mountpoint = self.tmp / f"mnt-{client}-{dataset}"
        mountpoint.mkdir(exist_ok=True)
        self.mounts.append(mountpoint)
        result = self.net[client].run(
            cachefs_cmd(
                "mount",
                dataset,
                str(mountpoint),
                "--master",
                self.master_address,
                "--secret-file",
                str(self.secret_file),
                *args,
            ),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return mountpoint

    @property
    def secret_file(self) -> Path:
        """The secret the master created; other hosts get it as a copy would be given to them
        (--secret-file), while commands on the master's host find it themselves."""
        return self.tmp / "master-state" / "secret"

    def logs(self) -> str:
        """The tail of every process's log (for assertion messages)."""
        parts = []
        for service in [self.master, *self.workers.values()]:
            parts.append(f"--- {service.host.name}\n{service.log()[-1500:]}")
        return "\n".join(parts)


@pytest.fixture
def cluster(tmp_path, moto_server):
    """cluster(workers=("w1", "w2", "w3"), worker_args={"w1": [...]}, liveness=5.0) -> a
    started Cluster."""
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", moto_server.endpoint, **kwargs)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size) -> a directory on a fresh tmpfs of that size (unmounted at the end)."""
    made: list[Path] = []

    def make(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(made)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True)  # fmt: skip
        made.append(path)
        return path

    try:
        yield make
    finally:
        for path in made:
            subprocess.run(["umount", "-l", str(path)], check=False)
