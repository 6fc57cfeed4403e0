"""The master's web console (`--http HOST:PORT`): a live page and the JSON API behind it.

    GET /healthz          200 "ok" while the master's event loop answers (no token needed)
    GET /login?token=T    sets the session cookie and redirects to / (401 for a wrong token)
    GET /                 the console page (refreshes itself every 2 s)
    GET /api/status       datasets (size, cached %, hit ratio), workers (tiers, liveness), jobs
    GET /api/datasets     the datasets alone
    GET /api/jobs         the load jobs alone

Everything but /healthz and /login needs the console token (the master keeps it in
STATE/console-token): `Authorization: Bearer TOKEN`, or the cookie /login sets. The cookie holds
an HMAC of the token, not the token, since browsers send it to every port of the host.

The HTTP server runs in its own threads and asks the trio side for data with trio.from_thread,
so the event loop never blocks on a browser. It is bounded so that clients cannot pile up
threads: at most MAX_CONNECTIONS at once (503 beyond), one request per connection, the request
head read within REQUEST_TIMEOUT and MAX_HEAD_BYTES, the response written within WRITE_TIMEOUT.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import socket
import socketserver
import threading
import time
from hashlib import sha256
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

import trio

from cachefs.config import format_address
from cachefs.errors import CacheFsError
from cachefs.master.console_page import OTHER_CSP, PAGE, PAGE_CSP

log = logging.getLogger("cachefs.master.console")

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 5.0  # for the whole request head, so a slow drip cannot extend it
MAX_HEAD_BYTES = 32 * 1024  # browsers send every cookie of the host, other apps' too
WRITE_TIMEOUT = 10.0
HEALTH_TIMEOUT = 1.0  # Kubernetes probes give up after 1 s by default
SNAPSHOT_MAX_AGE = 1.0  # many open pages share one status call per second
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}

_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 31\r\nConnection: close\r\n\r\n"
    b'{"error": "too many requests"}\n'
)


class _HeadTooLarge(Exception):
    pass


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False  # stop() runs on the trio thread, which handler threads may wait for
    request_queue_size = 128  # a burst of connects waits in the backlog, not in SYN retries

    def __init__(self, console: Console, host: str, port: int):
        self.console = console
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), _Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            # Answered from the accepting thread without blocking it: the reply fits the
            # fresh socket's send buffer, and a client that does not read it loses it.
            request.setblocking(False)
            try:
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # Hang-ups are caught where responses are written; what reaches here is a bug.
        log.warning("console request from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    default_request_version = "HTTP/1.0"  # so even a bare "GET /" gets a status line

    def version_string(self) -> str:
        return "cachefs"  # no Python version for scanners

    def log_message(self, *args):
        pass  # request lines carry the login token; they are never logged

    def handle(self):
        self.command, self.requestline, self.close_connection = None, "", True
        self.request_version = self.default_request_version
        try:
            head = self._read_head()
        except (_HeadTooLarge, TimeoutError) as exc:
            self.connection.settimeout(WRITE_TIMEOUT)
            if isinstance(exc, _HeadTooLarge):
                return self._json(431, {"error": "request head too large"})
            return self._json(408, {"error": "request not received in time"})
        except OSError:
            return  # the client reset the connection
        if head is None:
            return
        self.connection.settimeout(WRITE_TIMEOUT)
        self.rfile = io.BytesIO(head)
        self.raw_requestline = self.rfile.readline()
        if not self.parse_request():
            return  # parse_request sent the error
        if self.command != "GET":
            self._json(405, {"error": "only GET is served"}, [("Allow", "GET")])
            return
        self._route()

    def _read_head(self) -> bytes | None:
        """The request line and headers, or None when the client hangs up first."""
        deadline = time.monotonic() + REQUEST_TIMEOUT
        head = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.connection.settimeout(remaining)
            chunk = self.connection.recv(4096)
            if not chunk:
                return None
            start = max(0, len(head) - 2)
            head += chunk
            if len(head) > MAX_HEAD_BYTES:
                raise _HeadTooLarge
            if head.find(b"\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0:
                return bytes(head)

    def _route(self) -> None:
        console = self.server.console
        path, _, query = self.path.partition("?")
        if path == "/healthz":
            if console.loop_alive():
                return self._send(200, "text/plain; charset=utf-8", b"ok\n")
            return self._json(503, {"error": "the master's event loop does not answer"})
        if path == "/login":
            return self._login(query)
        if not self._authorized():
            return self._json(401, {"error": "authentication required: open the URL printed "
                                    "by `cachefs console-url`, or send Authorization: Bearer "
                                    "TOKEN with the token in STATE/console-token"})  # fmt: skip
        routes = {
            "/": console.page,
            "/api/status": console.status,
            "/api/datasets": lambda: console.part("datasets"),
            "/api/jobs": lambda: console.part("jobs"),
        }
        route = routes.get(path)
        if route is None:
            return self._json(404, {"error": "not found"})
        try:
            content_type, body = route()
        except (CacheFsError, trio.RunFinishedError, trio.Cancelled) as exc:
            message = exc.message if isinstance(exc, CacheFsError) else "the master is stopping"
            return self._json(503, {"error": message})
        self._send(200, content_type, body)

    def _login(self, query: str) -> None:
        console = self.server.console
        given = parse_qs(query).get("token", [""])[0]
        if not console.check_token(given):
            return self._json(401, {"error": "wrong or missing token"})
        cookie = f"{console.cookie_name}={console.session}; Path=/; HttpOnly; SameSite=Strict"
        # 303 to / so the token leaves the address bar (it stays in the browser's history).
        self._send(303, "application/json", b"{}\n", [("Location", "/"), ("Set-Cookie", cookie)])

    def _authorized(self) -> bool:
        console = self.server.console
        scheme, _, value = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer":  # an explicit token decides, right or wrong; other
            return console.check_token(value.strip())  # schemes may be a proxy's own login
        for line in self.headers.get_all("Cookie") or []:
            for pair in line.split(";"):
                name, _, value = pair.strip().partition("=")
                if name == console.cookie_name and _same(value, console.session):
                    return True
        return False

    def send_error(self, code, message=None, explain=None):
        # The standard phrase only: the library's messages echo the request line (and token).
        self._json(code, {"error": self.responses.get(code, ("error",))[0]})

    def _json(self, code: int, obj: dict, headers=()) -> None:
        self._send(code, "application/json", json.dumps(obj).encode() + b"\n", headers)

    def _send(self, code: int, content_type: str, body: bytes, headers=()) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            html = content_type.startswith("text/html")
            self.send_header("Content-Security-Policy", PAGE_CSP if html else OTHER_CSP)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client left or stopped reading (WRITE_TIMEOUT)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


class Console:
    """Serves the console for `service` (a MasterService) until `stop()`.

    `token` is the console token; every data route needs it (see the module docstring).
    """

    def __init__(
        self,
        service,
        host: str,
        port: int,
        trio_token: trio.lowlevel.TrioToken,
        *,
        token: str,
    ):
        if not token or len(token) < 16:
            raise ValueError("the console needs a token of at least 16 characters")
        self.service = service
        self._trio_token = trio_token
        self._token = token
        # What the cookie holds: useless as a Bearer token, and changes when the token does.
        self.session = hmac.new(token.encode(), b"cachefs console session", sha256).hexdigest()
        self._snapshot_lock = threading.Lock()
        self._snapshot_at, self._snapshot_value = float("-inf"), None
        self._server = _Server(self, host, port)
        self.address = self._server.server_address[:2]
        # Cookies are per host, not per port: two masters on one host keep separate sessions.
        self.cookie_name = f"cachefs_console_{self.address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="console", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("console on http://%s/ (log in with `cachefs console-url`)",
                 format_address(self.address))  # fmt: skip

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
        self._server.server_close()

    def login_url(self, host: str | None = None) -> str:
        """The URL that logs a browser in. A wildcard listen address is replaced by `host`
        (e.g. the host a client used to reach the master), else by this machine's name."""
        bound = self.address[0]
        if bound in WILDCARD_HOSTS:
            bound = host or socket.gethostname()
        return f"http://{format_address((bound, self.address[1]))}/login?token={self._token}"

    def check_token(self, given: str) -> bool:
        return _same(given, self._token)

    def loop_alive(self) -> bool:
        """Whether the trio loop runs a callback within HEALTH_TIMEOUT (without a waiting
        thread left behind when it does not)."""
        ran = threading.Event()
        try:
            self._trio_token.run_sync_soon(ran.set)
        except trio.RunFinishedError:
            return False
        return ran.wait(HEALTH_TIMEOUT)

    def page(self) -> tuple[str, bytes]:
        return "text/html; charset=utf-8", PAGE

    def _snapshot(self) -> dict:
        with self._snapshot_lock:
            if time.monotonic() - self._snapshot_at > SNAPSHOT_MAX_AGE:
                self._snapshot_value = trio.from_thread.run(
                    self.service.rpc_status, trio_token=self._trio_token
                )
                self._snapshot_at = time.monotonic()
            return self._snapshot_value

    def status(self) -> tuple[str, bytes]:
        return "application/json", json.dumps(self._snapshot(), default=str).encode()

    def part(self, key: str) -> tuple[str, bytes]:
        return "application/json", json.dumps(self._snapshot()[key], default=str).encode()
