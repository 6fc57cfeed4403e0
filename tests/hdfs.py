"""A real HDFS for tests: a NameNode and DataNodes started by scripts/hdfs-test-cluster.sh.

Fixtures (imported by tests/conftest.py):
- `hdfs_cluster` (session): an `HdfsCluster` with `DATANODES` DataNodes (replication 3), on
  127.0.0.1; `.uri` is "hdfs://127.0.0.1:PORT", `.dir` holds its conf, data and logs/.
- `hdfs`: the same cluster for one test that injects faults: after the test, every paused node
  is resumed and every stopped or killed one started again (and waited for).

Mark tests that use them `@pytest.mark.hdfs`. The first start installs Hadoop's jars into a cache
(see the script); a session start then takes a few seconds. Under CI=true a cluster that cannot
start fails the tests; elsewhere they are skipped only when there is no Java.

Clients: `cluster.client()` is an hdfs_native.Client with `CLIENT_CONFIG`, under which a read
from a paused DataNode moves to another replica after the 3 s socket timeout and a call to a
dead NameNode fails within ~0.2 s instead of retrying forever. (A *paused* NameNode still hangs
hdfs-native calls: the caller needs its own deadline.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "hdfs-test-cluster.sh"
DATANODES = 3
#: hdfs-native settings (strings, as in hdfs-site.xml) under which no call waits forever on a
#: paused DataNode (3 s socket timeout, then the next replica) or a dead NameNode (one retry
#: after 0.1-0.2 s, then "Connection refused"; by default it retries forever).
CLIENT_CONFIG = {
    "dfs.client.socket-timeout": "3000",
    "dfs.client.failover.max.attempts": "1",
    "dfs.client.failover.sleep.base.millis": "100",
    "dfs.client.failover.sleep.max.millis": "200",
}
#: Hadoop's default proxy provider for a name service (hdfs-native's behaviour without one too).
FAILOVER_PROVIDER = "org.apache.hadoop.hdfs.server.namenode.ha.ConfiguredFailoverProxyProvider"
#: The script's bound on installing (first use: ~15 s), formatting and waiting for readiness.
START_TIMEOUT = 600.0
NODE_TIMEOUT = 180.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _run_script(*args: str, timeout: float) -> str:
    """Runs the script; returns its stdout; raises RuntimeError with its output if it fails."""
    try:
        done = subprocess.run(
            ["bash", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{SCRIPT.name} {' '.join(args)}: no answer in {timeout:.0f} s") from e
    if done.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT.name} {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-2000:]}{done.stderr[-6000:]}"
        )
    return done.stdout


class HdfsCluster:
    """A running test cluster. Nodes are "namenode" and "datanode1".."datanodeN"."""

    def __init__(self, dir: Path, uri: str, datanodes: int):
        self.dir = dir
        self.uri = uri
        self.datanodes = datanodes
        self._paused: set[str] = set()
        self._down: set[str] = set()  # stopped or killed; start_node() brings one back
        self._client: Any = None

    @classmethod
    def start(cls, dir: Path, datanodes: int = DATANODES) -> HdfsCluster:
        out = _run_script("start", str(dir), str(datanodes), timeout=START_TIMEOUT)
        uri = out.strip().splitlines()[-1]
        if not uri.startswith("hdfs://127.0.0.1:"):
            raise RuntimeError(f"{SCRIPT.name} start printed no namenode URI: {out!r}")
        return cls(dir, uri, datanodes)

    def stop(self) -> None:
        """Stops every process of the cluster (a paused one too)."""
        _run_script("stop", str(self.dir), timeout=60)

    # --- clients and data --------------------------------------------------------------------

    def client(self, config: Mapping[str, str] | None = None) -> Any:
        """A new hdfs_native.Client for this cluster: CLIENT_CONFIG, updated with `config`."""
        from hdfs_native import Client

        return Client(self.uri, {**CLIENT_CONFIG, **(config or {})})

    def nameservice_config(self, ns: str) -> dict[str, str]:
        """Hadoop settings of an HA name service `ns` whose first NameNode (nn1) is dead (a
        loopback port nothing listens on) and whose second (nn2) is this cluster's NameNode."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        return {
            "dfs.nameservices": ns,
            f"dfs.ha.namenodes.{ns}": "nn1,nn2",
            f"dfs.namenode.rpc-address.{ns}.nn1": f"127.0.0.1:{dead}",
            f"dfs.namenode.rpc-address.{ns}.nn2": self.uri.removeprefix("hdfs://"),
            f"dfs.client.failover.proxy.provider.{ns}": FAILOVER_PROVIDER,
        }

    @property
    def shared_client(self) -> Any:
        """One client for the whole session (setup and checks)."""
        if self._client is None:
            self._client = self.client()
        return self._client

    def upload(
        self,
        files: Mapping[str, bytes],
        *,
        threads: int = 32,
        replication: int | None = None,
        block_size: int | None = None,
    ) -> None:
        """Writes each absolute path -> bytes (parents created, existing files replaced).

        Closing an HDFS file waits for the NameNode to see its last block (~0.5 s on 2.7), so
        files are written by many threads at once.
        """
        from hdfs_native import WriteOptions

        client = self.shared_client
        options = WriteOptions(
            replication=replication, block_size=block_size, overwrite=True, create_parent=True
        )

        def put(item: tuple[str, bytes]) -> None:
            path, data = item
            with client.create(path, options) as f:
                view = memoryview(data)
                for start in range(0, len(data), 1 << 20):
                    f.write(view[start : start + (1 << 20)])

        if not files:
            return
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            list(pool.map(put, files.items()))

    def read(self, path: str) -> bytes:
        with self.shared_client.read(path) as f:
            return f.read()

    # --- faults ------------------------------------------------------------------------------

    def pid(self, node: str) -> int | None:
        """The pid of a running (or paused) node, None if it is not running."""
        try:
            pid = int((self.dir / "pids" / f"{node}.pid").read_text())
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if f"-Dcachefs.hdfs.node={node}".encode() in args else None

    def _pid(self, node: str) -> int:
        pid = self.pid(node)
        if pid is None:
            raise RuntimeError(f"{node} is not running")
        return pid

    def pause(self, node: str) -> None:
        """SIGSTOP: the node keeps its sockets open but answers nothing."""
        os.kill(self._pid(node), signal.SIGSTOP)
        self._paused.add(node)

    def resume(self, node: str) -> None:
        """SIGCONT after pause()."""
        os.kill(self._pid(node), signal.SIGCONT)
        self._paused.discard(node)

    def kill(self, node: str) -> None:
        """SIGKILL, and waits until the process is gone (its ports refuse connections)."""
        pid = self._pid(node)
        os.kill(pid, signal.SIGKILL)
        self._down.add(node)
        self._paused.discard(node)
        deadline = time.monotonic() + 30
        while self.pid(node) == pid and time.monotonic() < deadline:
            time.sleep(0.05)  # polls for the exit of a process that is not our child

    def stop_node(self, node: str) -> None:
        """Stops a node cleanly (SIGTERM) and waits for it."""
        self._down.add(node)
        self._paused.discard(node)
        _run_script("stop-node", str(self.dir), node, timeout=60)

    def start_node(self, node: str) -> None:
        """Starts a stopped or killed node on its old data (the NameNode on its old ports) and
        waits until the NameNode is out of safe mode with every running DataNode live."""
        _run_script("start-node", str(self.dir), node, timeout=NODE_TIMEOUT)
        self._down.discard(node)

    def pause_datanode(self, i: int) -> None:
        self.pause(f"datanode{i}")

    def resume_datanode(self, i: int) -> None:
        self.resume(f"datanode{i}")

    def kill_datanode(self, i: int) -> None:
        self.kill(f"datanode{i}")

    def start_datanode(self, i: int) -> None:
        self.start_node(f"datanode{i}")

    def stop_namenode(self, *, kill: bool = False) -> None:
        """Stops the NameNode: SIGTERM and wait, or SIGKILL with `kill`."""
        if kill:
            self.kill("namenode")
        else:
            self.stop_node("namenode")

    def start_namenode(self) -> None:
        self.start_node("namenode")

    @contextlib.contextmanager
    def paused(self, node: str) -> Iterator[None]:
        """with cluster.paused("datanode2"): ... (resumed on the way out)."""
        self.pause(node)
        try:
            yield
        finally:
            self.resume(node)

    def heal(self) -> None:
        """Resumes paused nodes and starts stopped or killed ones (the NameNode first)."""
        for node in sorted(self._paused):
            pid = self.pid(node)
            if pid is not None:
                os.kill(pid, signal.SIGCONT)
        self._paused.clear()
        for node in sorted(self._down, key=lambda n: n != "namenode"):
            if self.pid(node) is None:
                self.start_node(node)
        self._down.clear()


def _missing_java() -> str | None:
    if shutil.which("java") is None:
        return "no `java` for the HDFS test cluster (apt-get install default-jre-headless)"
    return None


@pytest.fixture(scope="session")
def hdfs_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HdfsCluster]:
    """A real HDFS (NameNode + DATANODES DataNodes, replication 3) for the whole session."""
    problem = _missing_java()
    if problem and not in_ci():  # in CI the script installs Java
        pytest.skip(problem)
    dir = tmp_path_factory.mktemp("hdfs")
    try:
        cluster = HdfsCluster.start(dir, DATANODES)
    except RuntimeError as e:
        with contextlib.suppress(RuntimeError):
            _run_script("stop", str(dir), timeout=60)  # whatever it did start
        pytest.fail(f"the HDFS test cluster did not start: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def hdfs(hdfs_cluster: HdfsCluster) -> Iterator[HdfsCluster]:
    """The session's cluster for a test that pauses, kills or stops nodes: healed afterwards."""
    try:
        yield hdfs_cluster
    finally:
        hdfs_cluster.heal()
