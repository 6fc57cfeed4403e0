"""Real cachefs processes for tests: start, wait for the readiness line, stop, restart.

Servers print one line when they listen ("cachefs master listening on HOST:PORT"); tests wait
for that line instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT = 60.0


def cachefs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cachefs.cli", *args]


def run_cli(*args: str, timeout: float = 120.0, env: dict | None = None):
    """Runs `cachefs ARGS` to completion; returns the CompletedProcess (text, never raises)."""
    return subprocess.run(
        cachefs_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match:
    """Reads the process's stdout until a line matches; fails with what it printed otherwise."""
    deadline = time.monotonic() + timeout
    seen = []
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
    proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"no line matching {pattern!r}; stdout={seen!r} stderr={err[-2000:]!r}")


class ServiceProcess:
    """One cachefs server process (master or worker) that a test can stop and start again."""

    def __init__(self, kind: str, args: list[str], log_path: Path):
        self.kind = kind
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None

    def start(self) -> str:
        args = list(self.args)
        if self.address:  # a restart comes back on the same port
            args[args.index("--listen") + 1] = self.address
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cachefs_cmd("--log-level", "INFO", self.kind, *args),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        match = wait_for_line(self.proc, rf"cachefs {self.kind} listening on (\S+)")
        self.address = match.group(1)
        return self.address

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.proc.stdout.close()
            self._log.close()
        self.proc = None

    @property
    def secret(self) -> bytes | None:
        """The shared secret a master created in its state dir (None for other processes)."""
        path = Path(self.args[self.args.index("--state") + 1]) / "secret"
        return path.read_bytes().strip() if path.exists() else None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def master_process(tmp_path: Path, *extra: str) -> ServiceProcess:
    state = tmp_path / "master-state"
    return ServiceProcess(
        "master",
        ["--listen", "127.0.0.1:0", "--state", str(state), *extra],
        tmp_path / "master.log",
    )


def worker_process(
    tmp_path: Path, master: str, name: str = "w1", mem: str = "64M", *extra: str
) -> ServiceProcess:
    base = tmp_path / f"worker-{name}"
    return ServiceProcess(
        "worker",
        [
            "--master", master, "--listen", "127.0.0.1:0", "--state", str(base / "state"),
            "--mem", mem, "--shm", str(base / "shm"), "--host-id", name, *extra,
        ],
        tmp_path / f"worker-{name}.log",
    )  # fmt: skip


def stop_services(*services: ServiceProcess | None) -> None:
    """Stops master/worker processes in the order given; None stands for one never created."""
    for service in services:
        if service is not None:
            service.stop()


@contextlib.contextmanager
def running_cluster(
    tmp_path: Path, workers: int = 2, mem: str = "128M"
) -> Iterator[tuple[ServiceProcess, list[ServiceProcess]]]:
    """A master and `workers` workers (w1, w2, ...) started; (master, workers); all stopped at
    the end, workers first."""
    master = master_process(tmp_path)
    master.start()
    names = [f"w{i}" for i in range(1, workers + 1)]
    started = [worker_process(tmp_path, master.address, name, mem) for name in names]
    try:
        for worker in started:
            worker.start()
        yield master, started
    finally:
        stop_services(*started, master)


def add_dataset(master: ServiceProcess, name: str, source: Path) -> None:
    """`cachefs dataset add NAME file://SOURCE` on `master`; fails the test if it fails."""
    result = run_cli("dataset", "add", name, source.as_uri(), "--master", master.address)
    assert result.returncode == 0, result.stderr
