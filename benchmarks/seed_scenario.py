"""The case study's experiment (issue #15): training hosts read a rawframes-like dataset from a
real HDFS, directly and through cachefs, on 1, 2 and 3 hosts; then job success under HDFS faults.

The store: a real HDFS 2.7.3 (scripts/hdfs-test-cluster.sh: a NameNode and 3 DataNodes,
replication 3) on this machine's loopback, reached only through relays (tests/store_proxy.py,
protocol tcp) on the `store` host: every answer arrives `--latency-ms` late and each DataNode
sends at most `--datanode-mbps` MB/s to this job (a remote HDFS shared with other jobs: the
case study's 10-100x slower small-file reads). DataNodes advertise the store host's address;
clients connect by host name (dfs.client.use.datanode.hostname).

Hosts are network namespaces (tests/cluster/netns.py): `master`, `store`, and training hosts
h1..h3, each with a cachefs worker (RAM tier) and a cluster mount, as Fluid puts a runtime worker
and FUSE on every training node. For each host count H a fresh cachefs cluster of H workers is
started, the dataset added and `cachefs load`ed, then epochs run on H hosts at once, each host
reading its shard (benchmarks/train_reader.py: `--threads` readers, batches of `--batch`, the
accelerator emulated as DLIO does: `--compute-ms` of sleep per batch): directly from HDFS
(hdfs-native in the training process, cachefs's client settings, same threads) and through
the host's mount. The epoch ends when the last host ends.

Job success: a job is one epoch on 3 hosts; during each run a DataNode is paused (SIGSTOP, held
for `--pause-s`) or killed (restarted after the run). A job fails at its first read error or
when it runs longer than 3x its fault-free time. Direct readers use hdfs-native's own defaults
(a client as a training script opens it) and cachefs's settings, both measured.

    python benchmarks/seed_scenario.py [--files 10000] [--rounds 2] [--job-runs 3]
        [--results benchmarks/results.md]       # ~30 min; needs root (namespaces, FUSE)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.dataset import Shape, describe, ensure_dataset  # noqa: E402
from benchmarks.harness import machine  # noqa: E402
from benchmarks.results import replace_section  # noqa: E402
from cachefs.ufs_hdfs import CLIENT_DEFAULTS  # noqa: E402
from tests.cluster.conftest import Cluster  # noqa: E402
from tests.cluster.netns import Network, cleanup_run  # noqa: E402
from tests.hdfs import HdfsCluster  # noqa: E402
from tests.store_proxy import StoreProxy  # noqa: E402

NAME = "frames"
ROOT = "/seed/frames"
HOSTS = ("h1", "h2", "h3")
BY_HOSTNAME = {"dfs.client.use.datanode.hostname": "true"}
SECTION = "Case study scenario: HDFS, 1-3 training hosts (#15)"


def datanode_ports(hdfs: HdfsCluster) -> dict[str, int]:
    """DataNode -> its data-transfer port, from its log's last start."""
    ports = {}
    for log in sorted((hdfs.dir / "logs").glob("datanode*.log")):
        found = re.findall(r"Opened streaming server at /[\d.]+:(\d+)", log.read_text())
        if found:
            ports[log.stem] = int(found[-1])
    return ports


class Store:
    """The relays on the store host: the NameNode's (latency) and each DataNode's (latency and
    bandwidth), on the same ports as the real ones."""

    def __init__(self, hdfs: HdfsCluster, net: Network, latency: float, bandwidth: float):
        self.hdfs, self.host = hdfs, net["store"]
        self.latency, self.bandwidth = latency, bandwidth
        self.relays: dict[int, StoreProxy] = {}
        self.nn_port = int(hdfs.uri.rsplit(":", 1)[1])
        self._relay(self.nn_port, bandwidth=0.0)
        self.refresh()

    def _relay(self, port: int, bandwidth: float) -> None:
        self.relays[port] = StoreProxy(
            f"127.0.0.1:{port}", host=self.host.ip, port=port, bind=self.host.bind_here,
            subprocess=True, protocol="tcp", delay=self.latency, bandwidth=bandwidth,
        )  # fmt: skip

    def refresh(self) -> None:
        """A relay for every DataNode port (a restarted DataNode has a new one)."""
        for port in datanode_ports(self.hdfs).values():
            if port not in self.relays:
                self._relay(port, self.bandwidth)

    @property
    def uri(self) -> str:
        return f"hdfs://{self.host.ip}:{self.nn_port}{ROOT}"

    def bytes_sent(self) -> int:
        return sum(r.counts()["bytes_down"] for r in self.relays.values())

    def close(self) -> None:
        for relay in self.relays.values():
            relay.stop()


class Scenario:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.epochs: dict[tuple[str, int], list[dict]] = {}
        self.loads: dict[int, dict] = {}
        self.jobs: dict[tuple[str, str], list[dict]] = {}

    # --- running training hosts ----------------------------------------------------------

    def shards(self, hosts: int, seed: int) -> list[Path]:
        files = sorted(self.manifest)
        random.Random(seed).shuffle(files)
        paths = []
        for i in range(hosts):
            path = self.work / f"shard-{hosts}-{i}.txt"
            path.write_text("\n".join(files[i::hosts]) + "\n")
            paths.append(path)
        return paths

    def epoch(self, net: Network, sources: list[str], configs: dict, seed: int,
              give_up: float = 3600.0, during=None) -> dict:  # fmt: skip
        """One epoch on len(sources) hosts at once; `during(started)` runs alongside."""
        a = self.args
        procs = []
        shards = self.shards(len(sources), seed)
        for i, (source, shard) in enumerate(zip(sources, shards, strict=True)):
            argv = [sys.executable, "-m", "benchmarks.train_reader", "--manifest",
                    str(self.manifest_path), "--files", str(shard), "--source", source,
                    "--threads", str(a.threads), "--batch", str(a.batch),
                    "--compute-ms", str(a.compute_ms), "--give-up", str(give_up),
                    *[f"--config={k}={v}" for k, v in configs.items()]]  # fmt: skip
            procs.append(net[HOSTS[i]].popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True))
        started = time.monotonic()
        if during is not None:
            during(started)
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=give_up + 120)
            results.append(json.loads(out.strip().splitlines()[-1]))
        seconds = max(r["seconds"] for r in results)
        return {
            "seconds": seconds, "files": sum(r["files"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
            "hung": any(r["hung"] for r in results),
            "complete": all(r["complete"] for r in results),
            "utilization": sum(r["compute"] for r in results) / (seconds * len(results)),
        }  # fmt: skip

    def record(self, system: str, hosts: int, result: dict) -> None:
        self.epochs.setdefault((system, hosts), []).append(result)
        print(f"{system} x{hosts}: {result['seconds']:.1f} s, {result['files']} files, "
              f"util {result['utilization']:.0%}, errors {result['errors']}", flush=True)

    # --- the scenario --------------------------------------------------------------------

    def cluster(self, net: Network, hosts: int) -> Cluster:
        names = HOSTS[:hosts]
        return Cluster(
            self.work / f"cluster-{hosts}", None, workers=names, clients=(), net=net,
            worker_args={n: ["--mem", self.args.worker_mem] for n in names},
        ).start()  # fmt: skip

    def prepare(self, c: Cluster, hosts: int) -> list[str]:
        """Adds and loads the dataset; returns each host's mount."""
        options = [f"-o{k}={v}" for k, v in BY_HOSTNAME.items()]
        c.cli("dataset", "add", NAME, self.store.uri, *options, timeout=600)
        sent = self.store.bytes_sent()
        started = time.monotonic()
        c.cli("load", NAME, timeout=3600)
        seconds = time.monotonic() - started
        self.loads[hosts] = {"seconds": seconds, "files_s": len(self.manifest) / seconds,
                             "store_bytes": self.store.bytes_sent() - sent}  # fmt: skip
        print(f"load x{hosts}: {seconds:.1f} s", flush=True)
        # One serving process per mount: the hosts share this machine's 2 cores.
        return [str(c.mount(h, NAME, "--procs", "1")) for h in HOSTS[:hosts]]

    def scaling(self, net: Network) -> None:
        direct_config = {**CLIENT_DEFAULTS, **BY_HOSTNAME}
        for hosts in (1, 2, 3):
            c = self.cluster(net, hosts)
            try:
                mounts = self.prepare(c, hosts)
                for r in range(self.args.rounds):
                    seed = 100 * hosts + r
                    direct = [self.store.uri] * hosts
                    self.record("direct", hosts, self.epoch(net, direct, direct_config, seed))
                    self.record("cachefs", hosts, self.epoch(net, mounts, {}, seed))
                if hosts == 3:
                    self.job_success(net, mounts)
            finally:
                c.close()

    def job_success(self, net: Network, mounts: list[str]) -> None:
        a = self.args
        systems = {
            "direct (hdfs-native defaults)": ([self.store.uri] * 3, BY_HOSTNAME),
            "direct (cachefs's client settings)":
                ([self.store.uri] * 3, {**CLIENT_DEFAULTS, **BY_HOSTNAME}),
            "cachefs": (mounts, {}),
        }  # fmt: skip
        base = {
            "direct (hdfs-native defaults)": statistics.median(
                e["seconds"] for e in self.epochs[("direct", 3)]),
            "cachefs": statistics.median(e["seconds"] for e in self.epochs[("cachefs", 3)]),
        }  # fmt: skip
        base["direct (cachefs's client settings)"] = base["direct (hdfs-native defaults)"]
        rng = random.Random(5)
        for run in range(a.job_runs):
            for fault in ("pause", "kill"):
                node = f"datanode{rng.randint(1, 3)}"
                at = rng.uniform(0.1, 0.4)
                for system, (sources, config) in systems.items():
                    limit = 3 * base[system]

                    timers: list[threading.Timer] = []

                    def inject(started, node=node, at=at * base[system], fault=fault, t=timers):
                        time.sleep(max(0.0, started + at - time.monotonic()))
                        if fault == "kill":
                            self.hdfs.kill(node)
                            return
                        self.hdfs.pause(node)
                        if a.pause_s:  # else: hung until the run ends
                            t.append(threading.Timer(a.pause_s, self.hdfs.resume, (node,)))
                            t[-1].start()

                    try:
                        result = self.epoch(net, sources, config, seed=1000 + run,
                                            give_up=limit, during=inject)  # fmt: skip
                    finally:
                        for timer in timers:
                            timer.cancel()
                        self.hdfs.heal()
                        self.store.refresh()
                    ok = result["complete"] and not result["errors"] and result["seconds"] <= limit
                    result.update(ok=ok, node=node, limit=limit)
                    self.jobs.setdefault((system, fault), []).append(result)
                    print(f"job {system} {fault} {node}: {'ok' if ok else 'FAILED'} "
                          f"{result['seconds']:.1f} s (limit {limit:.0f}), errors "
                          f"{result['errors']} {result['first_error'] or ''}", flush=True)

    def run(self) -> str:
        a = self.args
        shape = Shape(files=a.files, median=a.median_bytes, sigma=0.6, large_every=0)
        data, self.manifest = ensure_dataset(a.data, shape)
        self.manifest_path = a.data / "manifest.json"
        net = Network()
        try:
            net.add_host("store")
            os.environ["CACHEFS_HDFS_ADVERTISE"] = net["store"].ip
            started = time.monotonic()
            self.hdfs = HdfsCluster.start(self.work / "hdfs", datanodes=3)
            try:
                self.upload(data)
                print(f"HDFS up and loaded in {time.monotonic() - started:.0f} s", flush=True)
                self.store = Store(self.hdfs, net, a.latency_ms / 1000, a.datanode_mbps * 1e6)
                try:
                    self.scaling(net)
                finally:
                    self.store.close()
            finally:
                self.hdfs.stop()
        finally:
            net.close()
            cleanup_run()
        return self.report(shape)

    def upload(self, data: Path) -> None:
        """Writes the dataset into HDFS on the loopback (not through the relays)."""
        def put(rel: str) -> None:
            self.hdfs.upload({f"{ROOT}/{rel}": (data / rel).read_bytes()}, threads=1)

        with ThreadPoolExecutor(self.args.upload_threads) as pool:
            list(pool.map(put, self.manifest))

    # --- the report ----------------------------------------------------------------------

    def report(self, shape: Shape) -> str:
        from benchmarks.seed_report import render

        return render(self, shape, describe(self.manifest), machine())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--median-bytes", type=int, default=24_000, help="median frame size")
    p.add_argument("--data", type=Path, default=Path("/var/tmp/cachefs-seed"))
    p.add_argument("--latency-ms", type=float, default=10.0)
    p.add_argument("--datanode-mbps", type=float, default=2.0, help="MB/s per DataNode")
    p.add_argument("--threads", type=int, default=8, help="reader threads per host")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--compute-ms", type=float, default=64.0, help="accelerator time per batch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--job-runs", type=int, default=2, help="runs per fault kind and system")
    p.add_argument("--pause-s", type=float, default=0.0,
                   help="seconds a DataNode stays paused (0: until the run ends)")
    p.add_argument("--worker-mem", default="1G")
    p.add_argument("--upload-threads", type=int, default=64)
    p.add_argument("--results", type=Path, help="results.md to update")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("seed_scenario: needs root (network namespaces, FUSE mounts)")
    with tempfile.TemporaryDirectory(prefix="cachefs-seed-") as tmp:
        text = Scenario(args, Path(tmp)).run()
    print(text)
    if args.results:
        replace_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
