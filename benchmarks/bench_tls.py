"""What does TLS cost on the RPC path? The same server with and without TLS, side by side.

A server process runs two `RpcServer`s over one handler (plain and mutual TLS with a cluster
CA made for the run, both with the shared secret); the handler answers `blob(size)` with that
many bytes (4 KiB, 64 KiB, 1 MiB). This process runs 8 concurrent callers, each its own
`RpcClient` with one connection, for `--seconds` per pass; passes alternate plain and TLS so
both see the same machine state. Reports per size the median and range of ops/s and MiB/s over
the passes, and the TLS/plain ratio of the medians; then the cost of a new connection
(TCP + TLS + shared-secret handshake + one call), sequentially.

    python benchmarks/bench_tls.py                       # 5 passes of 2 s per size and mode
    python benchmarks/bench_tls.py --results benchmarks/results.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import replace_section  # noqa: E402
from cachefs.rpc import Reply, RpcClient, RpcServer  # noqa: E402
from cachefs.tls import TlsConfig  # noqa: E402

SIZES = {"4 KiB": 4 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20}
CALLERS = 8
SECRET = b"bench-tls-secret-0123456789abcdef"
TITLE = "TLS cost (bench_tls.py)"


class Blob:
    def __init__(self):
        self.data = memoryview(os.urandom(max(SIZES.values())))

    async def rpc_blob(self, size: int):
        return Reply(size, self.data[:size])


def make_certs(path: Path) -> dict[str, tuple[str, str, str]]:
    import trustme

    ca = trustme.CA()
    ca_file = str(path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    out = {}
    for name in ("server", "client"):
        issued = ca.issue_cert("127.0.0.1")
        cert, key = str(path / f"{name}.pem"), str(path / f"{name}.key")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        out[name] = (cert, key, ca_file)
    return out


async def serve(certs: Path) -> None:
    server_tls = TlsConfig.from_files(*make_certs_paths(certs, "server"))
    handler = Blob()
    async with trio.open_nursery() as nursery:
        plain = await nursery.start(RpcServer(handler, secret=SECRET).serve, "127.0.0.1", 0)
        tls = await nursery.start(
            RpcServer(handler, secret=SECRET, tls=server_tls).serve, "127.0.0.1", 0
        )
        print(f"ready {plain[1]} {tls[1]}", flush=True)


def make_certs_paths(path: Path, name: str) -> tuple[str, str, str]:
    return str(path / f"{name}.pem"), str(path / f"{name}.key"), str(path / "ca.pem")


async def one_pass(port: int, tls: TlsConfig | None, size: int, seconds: float) -> float:
    """Calls/s of CALLERS concurrent callers, each on its own connection."""
    done = 0
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(CALLERS):
            client = RpcClient(("127.0.0.1", port), secret=SECRET, tls=tls, pool_size=1)
            clients.append(await nursery.start(_hold, client))
        for client in clients:  # connect (and handshake) before the clock starts
            await client.call_with_payload("blob", size=1)
        deadline = trio.current_time() + seconds

        async def caller(client):
            nonlocal done
            while trio.current_time() < deadline:
                _, data = await client.call_with_payload("blob", size=size)
                assert len(data) == size
                done += 1

        start = trio.current_time()
        async with trio.open_nursery() as callers:
            for client in clients:
                callers.start_soon(caller, client)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return done / elapsed


async def _hold(client: RpcClient, task_status=trio.TASK_STATUS_IGNORED):
    async with client:
        task_status.started(client)
        await trio.sleep_forever()


async def connect_rate(port: int, tls: TlsConfig | None, n: int) -> float:
    """New connections per second, each TCP + TLS + secret handshake + one call, one at a time."""
    start = trio.current_time()
    for _ in range(n):
        async with RpcClient(("127.0.0.1", port), secret=SECRET, tls=tls, pool_size=1) as c:
            await c.call("blob", size=1)
    return n / (trio.current_time() - start)


async def negotiated(port: int, tls: TlsConfig) -> str:
    async with RpcClient(("127.0.0.1", port), secret=SECRET, tls=tls, pool_size=1) as c:
        await c.call("blob", size=1)
        stream = c._conns[0].stream
        return f"{stream.version()}, {stream.cipher()[0]}"


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


async def measure(ports: tuple[int, int], client_tls: TlsConfig, args) -> tuple[str, str, str]:
    version = await negotiated(ports[1], client_tls)
    rows = []
    for label, size in SIZES.items():
        rates = {"plain": [], "tls": []}
        for _ in range(args.passes):
            for mode, port, tls in (("plain", ports[0], None), ("tls", ports[1], client_tls)):
                rates[mode].append(await one_pass(port, tls, size, args.seconds))
        cells = [label]
        for mode in ("plain", "tls"):
            med, lo, hi = summary(rates[mode])
            mib = size / (1 << 20)
            cells.append(f"{med:,.0f} ({lo:,.0f}-{hi:,.0f})")
            cells.append(f"{med * mib:,.1f} ({lo * mib:,.1f}-{hi * mib:,.1f})")
        ratio = statistics.median(rates["tls"]) / statistics.median(rates["plain"])
        rows.append(cells + [f"{ratio:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    connects = {
        mode: summary([await connect_rate(port, tls, args.connects) for _ in range(3)])
        for mode, port, tls in (("plain", ports[0], None), ("tls", ports[1], client_tls))
    }
    table = [
        "| reply size | plain ops/s median (range) | plain MiB/s | TLS ops/s median (range) "
        "| TLS MiB/s | TLS / plain |",
        "|---:|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    c_plain, c_tls = connects["plain"], connects["tls"]
    connect_line = (
        f"- New connections (TCP, then TLS, then the shared-secret handshake and one call; one "
        f"at a time, {args.connects} per run, 3 runs): plain {c_plain[0]:,.0f}/s "
        f"({c_plain[1]:,.0f}-{c_plain[2]:,.0f}), TLS {c_tls[0]:,.0f}/s "
        f"({c_tls[1]:,.0f}-{c_tls[2]:,.0f}), ratio {c_tls[0] / c_plain[0]:.2f}."
    )
    return "\n".join(table), connect_line, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--results", type=Path, help="also write the section into this file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_certs(Path(tmp))
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", tmp], stdout=subprocess.PIPE, text=True
        )
        try:
            line = server.stdout.readline().split()
            assert line and line[0] == "ready", "the server process did not start"
            ports = (int(line[1]), int(line[2]))
            client_tls = TlsConfig.from_files(*make_certs_paths(Path(tmp), "client"))
            started = time.monotonic()
            table, connects, version = trio.run(measure, ports, client_tls, args)
            took = time.monotonic() - started
        finally:
            server.terminate()
            server.wait()
    cmd = "python benchmarks/bench_tls.py" + (
        f" --passes {args.passes} --seconds {args.seconds:g}"
        if (args.passes, args.seconds) != (5, 2.0)
        else ""
    )
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with `{cmd}` "
        f"({took:.0f} s). One server process with two `RpcServer`s over the same handler, "
        f"plain and mutual TLS ({version}, certificates from a cluster CA; "
        f"the shared secret on both), answering `blob(size)` with a payload of that size; "
        f"{CALLERS} concurrent callers in this process, each an `RpcClient` with one "
        f"connection, {args.seconds:g} s per pass, {args.passes} passes per mode alternating "
        f"plain and TLS. Median (min-max) over the passes; the ratio is of the medians.\n\n"
        f"{table}\n\n{connects}\n"
    )
    print("\n" + body)
    if args.results:
        replace_section(args.results, TITLE, body)


if __name__ == "__main__":
    main()
