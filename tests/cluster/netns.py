"""Hosts as Linux network namespaces, wired to one bridge, for multi-host fault tests.

A `Network` makes one "switch" namespace holding a bridge, and a namespace per host linked to
it by a veth pair (`eth0` in the host, `v-<host>` on the switch) with an address in
10.199.<subnet>.0/24. Nothing is created in the root namespace: the veths are born inside their
namespaces. `lo` is up in every host.

Processes run in a host with `nsenter --net=...`, which joins only the network namespace: FUSE
mounts made by a process in a host are visible to the test process (one mount namespace).
A socket the test process itself needs in a host (the S3 proxy's listener) is made with
`Host.bind_here()`, which switches the calling thread's network namespace around the call.

Faults: `cut(host)` / `heal(host)` set the host's switch port down / up (frames to and from it
are dropped, as when a cable or a top-of-rack port dies); `block(address)` makes one peer
unreachable from a host (a route in the host's own namespace); processes are killed, paused and
resumed through `tests.cluster.conftest.NsService`.

Every namespace name starts with `RUN_PREFIX` (`cfs-<random>-`), unique to this test process,
so `cleanup_run()` can delete whatever a crashed test left behind without touching anything
else on the machine (other runs, or namespaces made by other tools).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

RUN_PREFIX = f"cfs-{secrets.token_hex(3)}-"
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
_networks = itertools.count(1)
_T = TypeVar("_T")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `ip ARGS`; raises with ip's own message when it fails (and check)."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def run_namespaces() -> list[str]:
    """Namespaces made by this test process (still existing)."""
    listed = ip("netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(RUN_PREFIX)]


def delete_namespace(name: str) -> None:
    """Kills what still runs in a namespace of ours (by pid), then deletes the namespace."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", name, check=False)


def cleanup_run() -> list[str]:
    """Deletes every namespace this test process made and left behind; returns their names."""
    leftovers = run_namespaces()
    for name in leftovers:
        delete_namespace(name)
    return leftovers


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """The calling thread (only) is in namespace `name` inside the block.

    Sockets made inside stay in that namespace for their whole life; threads started inside
    would inherit it, so start none.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # never leave the test thread elsewhere
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(own)


class Host:
    """One machine: a namespace with `eth0` at `ip` on the network's bridge."""

    def __init__(self, net: Network, name: str, ns: str, ip_addr: str, port: str):
        self.net = net
        self.name = name
        self.ns = ns
        self.ip = ip_addr
        self.port = port  # the switch-side veth
        self.is_cut = False

    def __repr__(self) -> str:
        return f"Host({self.name} {self.ip})"

    def cmd(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's network namespace (and nothing else of it)."""
        return ["nsenter", f"--net={NETNS_DIR / self.ns}", "--", *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kwargs)

    def run(self, argv: list[str], *, timeout: float = 120.0, env: dict | None = None):
        """Runs to completion; returns the CompletedProcess (text; never raises on failure)."""
        return subprocess.run(
            self.cmd(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def bind_here(self, factory: Callable[[], _T]) -> _T:
        """Calls `factory` (which makes listening sockets) with this thread in the host."""
        with in_netns(self.ns):
            return factory()

    def block(self, address: str) -> None:
        """This host can no longer reach `address` (a route that answers "unreachable")."""
        ip("-n", self.ns, "route", "add", "unreachable", f"{address}/32")

    def unblock(self, address: str) -> None:
        ip("-n", self.ns, "route", "del", "unreachable", f"{address}/32")

    def cut(self) -> None:
        """Unplugs the host: its switch port goes down, every frame to or from it is lost."""
        ip("-n", self.net.switch, "link", "set", self.port, "down")
        self.is_cut = True

    def heal(self) -> None:
        ip("-n", self.net.switch, "link", "set", self.port, "up")
        self.is_cut = False


class Network:
    """A bridge in its own namespace and the hosts plugged into it."""

    def __init__(self):
        self.id = next(_networks)
        self.prefix = f"{RUN_PREFIX}{self.id}-"
        self.subnet = 10 + self.id % 240  # 10.199.<subnet>.0/24 (isolated per network anyway)
        self.switch = f"{self.prefix}switch"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        self._addresses = itertools.count(1)
        self._add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        if name in self.hosts:
            raise ValueError(f"host {name} exists")
        ns = f"{self.prefix}{name}"
        port = f"v-{name}"[:15]
        address = f"10.199.{self.subnet}.{next(self._addresses)}"
        self._add_namespace(ns)
        # Both ends are created directly in their namespaces: the root namespace never sees them.
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
           "netns", self.switch)  # fmt: skip
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        host = self.hosts[name] = Host(self, name, ns, address, port)
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        """Deletes every namespace of this network (killing what still runs in them)."""
        for name in reversed(self._made):
            delete_namespace(name)
        self._made.clear()
