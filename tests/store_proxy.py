"""The remote store for tests and benchmarks: an HTTP/1.1 proxy in front of a real S3 server
(moto) that adds latency, injects faults and counts requests by kind.

    with StoreProxy(moto.endpoint, delay=0.002) as proxy:   # in a thread of this process
        fs = S3FileSystem(**proxy.options)
        proxy.set(fail_rate=0.2, stall_rate=0.05, stall_seconds=4)
        proxy.counts()["gets"], proxy.gets()["bucket/key"]

`subprocess=True` runs the same proxy in its own process (benchmarks: its CPU and GIL are not
the measured program's), driven over its stdin/stdout with one JSON line per command.
`bind=host.bind_here` makes the listening socket through a hook (tests/cluster: a socket in a
network namespace); a subprocess inherits that socket, so it needs no namespace of its own and
reaches moto on the test process's loopback.

Faults, each changeable at runtime with set(), decided per request by a seeded RNG:
- `delay` s before every answer (a remote store's first-byte latency);
- `fail_rate`: that share of requests answered 503 SlowDown (S3's transient error), unforwarded;
- `reset_rate`: that share of requests get their connection reset (RST), no answer;
- `stall_rate`: that share of answers held `stall_seconds` more (other connections flow on);
- stop(): the store vanishes: listener closed, every connection dropped.

Counts (counts()): requests, then by kind gets (object GETs), heads, lists (GET on a bucket),
others (PUT, DELETE, ...), all as they arrive (faulted ones too); failed, reset, stalled.
gets() counts object GETs by "bucket/key".

`protocol="tcp"` relays bytes instead (HDFS: one relay per NameNode / DataNode port): answers
reach the client `delay` s after they left the upstream, and at most `bandwidth` bytes/s flow
to clients over all of the relay's connections (a link or disk the store shares with other
jobs); counts are connections and bytes each way. Faults are the real store's own there (a
paused or killed DataNode).

Both sides keep connections alive, one upstream connection per client connection (reopened
when the upstream closes it: moto's werkzeug closes after every answer). Messages are read
whole and re-framed with Content-Length; hop-by-hop headers are dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable
from subprocess import PIPE, Popen, TimeoutExpired
from urllib.parse import parse_qsl, unquote

FAULTS = {"delay": 0.0, "fail_rate": 0.0, "reset_rate": 0.0, "stall_rate": 0.0,
          "stall_seconds": 4.0}  # fmt: skip
TCP_FAULTS = {"delay": 0.0, "bandwidth": 0.0}  # bandwidth in bytes/s; 0: unlimited
TCP_KINDS = ("connections", "bytes_up", "bytes_down")
CHUNK = 1 << 16
KINDS = ("requests", "gets", "heads", "lists", "others", "failed", "reset", "stalled")
SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
#: Query parameters that still make a GET of /bucket/key an object read.
OBJECT_PARAMS = {"versionId", "partNumber"}
#: Any of these on a GET of /bucket (or none at all: ListObjects v1) make it a listing.
LIST_PARAMS = {"list-type", "prefix", "delimiter", "marker", "continuation-token", "start-after"}
#: Hop-by-hop or framing headers: each side of the proxy gets its own.
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"expect",
       b"proxy-connection", b"te", b"trailer", b"upgrade"}  # fmt: skip
LIMIT = 1 << 18  # longest head or chunk-size line


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], list]:
    """(start line, lowercase name -> value, the header lines as sent)."""
    lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, lines[1:]


async def _read_body(reader: asyncio.StreamReader, headers: dict, to_eof: bool) -> bytes:
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers: dropped
            pass
        return b"".join(parts)
    if b"content-length" in headers:
        return await reader.readexactly(int(headers[b"content-length"]))
    return await reader.read() if to_eof else b""  # a response without framing ends at EOF


def _message(start: bytes, lines: list, length: int | None, body: bytes = b"") -> bytes:
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() not in HOP]
    if length is not None:
        kept.append(b"Content-Length: %d" % length)
    return b"\r\n".join([start, *kept, b"", body])


class _Server:
    """What both proxies share: their connection tasks, and closing them all with the server."""

    server: asyncio.Server
    tasks: set[asyncio.Task]

    async def close(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _Core(_Server):
    """The proxy's state and server; touched only from its event loop's thread."""

    def __init__(self, upstream: str, faults: dict, seed: int):
        self.upstream = upstream.rsplit(":", 1)
        self.faults = {**FAULTS, **faults}
        self.rng = random.Random(seed)
        self.counts: Counter = Counter(dict.fromkeys(KINDS, 0))
        self.by_key: Counter = Counter()
        self.tasks: set[asyncio.Task] = set()

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._serve, sock=sock, limit=LIMIT, backlog=1024)

    async def command(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "set":
            self.faults.update(cmd["faults"])
            return dict(self.faults)
        if op == "reset":
            self.counts = Counter(dict.fromkeys(KINDS, 0))
            self.by_key = Counter()
        return dict(self.by_key if op == "gets" else self.counts)

    def _arrive(self, method: bytes, target: bytes) -> str | None:
        """Counts a request; returns its fault: None, "reset", "failed" or "stalled"."""
        path, _, query = target.decode("latin-1").partition("?")
        bucket, _, key = unquote(path).lstrip("/").partition("/")
        params = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
        c = self.counts
        c["requests"] += 1
        if method == b"HEAD":
            c["heads"] += 1
        elif method == b"GET" and key and params <= OBJECT_PARAMS:
            c["gets"] += 1
            self.by_key[f"{bucket}/{key}"] += 1
        elif method == b"GET" and bucket and not key and (not params or params & LIST_PARAMS):
            c["lists"] += 1
        else:
            c["others"] += 1
        draw, f = self.rng.random(), self.faults  # one draw: the shares never overlap
        for fault, share in (("reset", f["reset_rate"]), ("failed", f["fail_rate"]),
                             ("stalled", f["stall_rate"])):  # fmt: skip
            if draw < share:
                c[fault] += 1
                return fault
            draw -= share
        return None

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        up = None  # (reader, writer) to the upstream, kept across this client's requests
        try:
            while True:
                start, headers, lines = await _read_head(cr)
                method, target, _ = start.split(b" ", 2)
                if b"100-continue" in headers.get(b"expect", b"").lower():
                    cw.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the upstream never sees Expect
                body = await _read_body(cr, headers, to_eof=False)
                fault = self._arrive(method, target)
                if fault == "reset":  # linger 0: close() sends RST instead of FIN
                    cw.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    return
                if fault == "failed":  # never forwarded: S3 refused it
                    status, rbody, length = b"HTTP/1.1 503 Slow Down", SLOWDOWN, len(SLOWDOWN)
                    rlines = [b"Content-Type: application/xml"]
                else:
                    framed = b"content-length" in headers or b"transfer-encoding" in headers
                    request = _message(start, lines, len(body) if framed else None, body)
                    up, (status, rlines, rbody, length) = await self._forward(up, request, method)
                stall = self.faults["stall_seconds"] if fault == "stalled" else 0.0
                hold = self.faults["delay"] + stall
                if hold:
                    await asyncio.sleep(hold)
                cw.write(_message(status, rlines, length, b"" if method == b"HEAD" else rbody))
                await cw.drain()
                if b"close" in headers.get(b"connection", b"").lower():
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
            pass  # the client left (or sent garbage): drop the connection
        except asyncio.CancelledError:
            pass  # stop(); ended, not cancelled: 3.11's stream callback logs cancelled handlers
        finally:
            self.tasks.discard(asyncio.current_task())
            cw.transport.abort()
            if up is not None:
                up[1].transport.abort()

    async def _forward(self, up, request: bytes, method: bytes):
        """Sends `request` upstream; (the connection to keep or None, the answer)."""
        while True:
            reused = up is not None
            if not reused:
                host, port = self.upstream
                up = await asyncio.open_connection(host, int(port), limit=LIMIT)
            try:
                up[1].write(request)
                await up[1].drain()
                while True:  # interim answers (100 Continue): the client had its own
                    status, headers, lines = await _read_head(up[0])
                    code = int(status.split(b" ", 2)[1])
                    if code >= 200:
                        break
                bodiless = method == b"HEAD" or code in (204, 304)
                body = b"" if bodiless else await _read_body(up[0], headers, to_eof=True)
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                up[1].transport.abort()
                up = None
                if not reused:
                    raise
                # an idle kept-alive connection the upstream had closed: once more, fresh
        framed = b"content-length" in headers or b"transfer-encoding" in headers
        if b"close" in headers.get(b"connection", b"").lower() or not (framed or bodiless):
            up[1].transport.abort()
            up = None
        if method == b"HEAD":  # the object's length, though no body follows
            length = int(headers.get(b"content-length", b"0"))
        else:
            length = None if code in (204, 304) else len(body)
        return up, (status, lines, body, length)


class _TcpCore(_Server):
    """A byte relay with one-way latency and a shared bandwidth; touched only from its loop."""

    def __init__(self, upstream: str, faults: dict, seed: int):
        self.upstream = upstream.rsplit(":", 1)
        self.faults = {**TCP_FAULTS, **faults}
        self.counts: Counter = Counter(dict.fromkeys(TCP_KINDS, 0))
        self.tasks: set[asyncio.Task] = set()
        self._link_free = 0.0  # when the shared link has sent everything scheduled so far

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._serve, sock=sock, backlog=1024)

    async def command(self, cmd: dict) -> dict:
        if cmd["op"] == "set":
            self.faults.update(cmd["faults"])
            return dict(self.faults)
        if cmd["op"] == "reset":
            self.counts = Counter(dict.fromkeys(TCP_KINDS, 0))
        return {} if cmd["op"] == "gets" else dict(self.counts)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        uw = None
        try:
            ur, uw = await asyncio.open_connection(self.upstream[0], int(self.upstream[1]))
            self.counts["connections"] += 1
            # Ahead of the client by at most 16 chunks: a slow link holds the upstream back.
            answers: asyncio.Queue = asyncio.Queue(16)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump_up(cr, uw))
                group.create_task(self._receive(ur, answers))
                group.create_task(self._deliver(answers, cw))
        except (OSError, ExceptionGroup):
            pass  # either side left: the other is dropped too
        except asyncio.CancelledError:
            pass  # stop()
        finally:
            self.tasks.discard(asyncio.current_task())
            cw.transport.abort()
            if uw is not None:
                uw.transport.abort()

    async def _pump_up(self, cr: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        while data := await cr.read(CHUNK):
            self.counts["bytes_up"] += len(data)
            uw.write(data)
            await uw.drain()
        uw.write_eof()

    async def _receive(self, ur: asyncio.StreamReader, answers: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while data := await ur.read(CHUNK):
            await answers.put((loop.time() + self.faults["delay"], data))
        await answers.put((loop.time() + self.faults["delay"], b""))

    async def _deliver(self, answers: asyncio.Queue, cw: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await answers.get()
            if bandwidth := self.faults["bandwidth"]:
                # The link sends chunks one after another, in the order they reach it.
                self._link_free = max(self._link_free, due) + len(data) / bandwidth
                due = self._link_free
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                cw.write_eof()
                raise ConnectionResetError("the upstream closed")  # ends the relay
            self.counts["bytes_down"] += len(data)
            cw.write(data)
            await cw.drain()


class _Loop:
    """An event loop in a daemon thread, running one _Core."""

    def __init__(self, core: _Core, sock: socket.socket):
        self.core = core
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="store-proxy")  # fmt: skip
        self.thread.start()
        self.run(core.start(sock))

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self.run(self.core.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class StoreProxy:
    """The proxy in front of `upstream` ("HOST:PORT"), listening on `host`:`port` (0: any
    free port); `faults` are FAULTS' keys. In this process (a thread) or, with `subprocess`,
    in a child process; the API is the same."""

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bind: Callable[[Callable[[], socket.socket]], socket.socket] | None = None,
        subprocess: bool = False,
        seed: int = 0,
        protocol: str = "http",
        **faults: float,
    ):
        _check(faults, protocol)
        listen = lambda: socket.create_server((host, port), backlog=1024)  # noqa: E731
        sock = bind(listen) if bind is not None else listen()
        self.endpoint = f"{host}:{sock.getsockname()[1]}"
        self.upstream = upstream
        self.protocol = protocol
        self._lock = threading.Lock()
        self._loop = self._proc = None
        self._last: dict | None = None  # the counts when stop() was called
        if not subprocess:
            self._loop = _Loop(CORES[protocol](upstream, faults, seed), sock)
            return
        config = {"upstream": upstream, "faults": faults, "seed": seed, "fd": sock.fileno(),
                  "protocol": protocol}  # fmt: skip
        self._proc = Popen([sys.executable, "-I", __file__, json.dumps(config)], stdin=PIPE,
                           stdout=PIPE, text=True, pass_fds=[sock.fileno()])  # fmt: skip
        sock.close()  # the child's copy listens: ours would keep the store up after stop()
        if self._proc.stdout.readline().strip() != '{"ready": true}':
            self._proc.kill()
            raise RuntimeError("the store proxy subprocess did not start")

    def __enter__(self) -> StoreProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def options(self) -> dict[str, str]:
        """Dataset options (pyarrow S3FileSystem arguments) that read through the proxy."""
        return {"endpoint_override": self.endpoint, "scheme": "http"}

    @property
    def pid(self) -> int | None:
        """The subprocess's pid (None in-process)."""
        return self._proc.pid if self._proc is not None else None

    def _command(self, op: str, **args) -> dict:
        if self._last is not None:  # stopped: counts stay readable
            if op not in self._last:
                raise RuntimeError(f"the store proxy is stopped ({op})")
            return self._last[op]
        cmd = {"op": op, **args}
        if self._loop is not None:
            return self._loop.run(self._loop.core.command(cmd))
        with self._lock:
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            return json.loads(self._proc.stdout.readline())

    def set(self, **faults: float) -> dict:
        """Changes some faults from the next request on; returns all of them."""
        _check(faults, self.protocol)
        return self._command("set", faults=faults)

    def counts(self) -> dict[str, int]:
        return self._command("counts")

    def gets(self) -> Counter:
        """Object GETs by "bucket/key"."""
        return Counter(self._command("gets"))

    def reset_counts(self) -> None:
        self._command("reset")

    def stop(self) -> None:
        """The store vanishes: listener closed, open connections dropped. Idempotent."""
        if self._last is not None:
            return
        try:
            last = {"counts": self.counts(), "gets": self._command("gets")}
        except (OSError, ValueError):  # the subprocess died
            last = {"counts": {}, "gets": {}}
        self._last = last
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        elif self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()  # the child exits at EOF
            try:
                self._proc.wait(10)
            except TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


CORES = {"http": _Core, "tcp": _TcpCore}


def _check(faults: dict, protocol: str) -> None:
    if protocol not in CORES:
        raise ValueError(f"protocol is one of {sorted(CORES)}, not {protocol!r}")
    known = TCP_FAULTS if protocol == "tcp" else FAULTS
    unknown = set(faults) - set(known)
    if unknown:
        raise TypeError(f"unknown {protocol} faults {sorted(unknown)}; known: {sorted(known)}")


def _child(config: dict) -> None:
    """The subprocess: serves on the inherited socket, answers commands until stdin closes."""
    core = CORES[config["protocol"]](config["upstream"], config["faults"], config["seed"])
    loop = _Loop(core, socket.socket(fileno=config["fd"]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(loop.run(core.command(json.loads(line)))), flush=True)
    os._exit(0)  # the kernel closes every connection at once: the store vanishes


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
