"""Wrappers around real parts, for faults a real part can't produce on demand (and counting)."""

from __future__ import annotations

import threading
import time


class FaultyFs:
    """Delegates to a real pyarrow filesystem; `faults` holds exceptions to raise first."""

    def __init__(self, real, faults=(), block: threading.Event | None = None):
        self.real = real
        self.faults = list(faults)
        self.block = block
        self.calls = 0
        self.opens = 0  # open_input_file calls: the remote data reads
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def _enter(self):
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            fault = self.faults.pop(0) if self.faults else None
        try:
            if self.block is not None:
                self.block.wait(timeout=30)
            if fault is not None:
                raise fault
            time.sleep(0.01)  # long enough for concurrent calls to overlap
        finally:
            with self._lock:
                self.active -= 1

    def get_file_info(self, arg):
        self._enter()
        return self.real.get_file_info(arg)

    def open_input_file(self, path):
        with self._lock:
            self.opens += 1
        self._enter()
        return self.real.open_input_file(path)


class S3Proxy:
    """An HTTP proxy in front of a real S3 server (moto) that counts, delays and fails requests.

    `gets` counts object GETs by path (bucket/key): the remote reads as the store sees them.
    `fail_rate` answers that share of requests with S3's 503 SlowDown (a transient error that
    clients retry); `delay` adds seconds before each answer; `stop()` makes the store vanish.
    """

    def __init__(self, upstream: str, *, fail_rate: float = 0.0, delay: float = 0.0, seed=0):
        import http.client
        import random
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.upstream = upstream
        self.fail_rate = fail_rate
        self.delay = delay
        self.gets: Counter = Counter()
        self.requests = 0
        self.failed = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopped = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                if proxy._stopped:  # kept-alive connections die with the store too
                    self.close_connection = True
                    self.connection.close()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy._rng.random() < proxy.fail_rate
                    if self.command == "GET" and "?" not in self.path:
                        proxy.gets[self.path.lstrip("/")] += 1
                    proxy.failed += fail
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fail:
                    error = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body
                        self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = proxy.upstream
                    conn.request(self.command, self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status)
                head = self.command == "HEAD"  # its Content-Length describes the object
                for key, value in reply.getheaders():
                    skip = ("transfer-encoding", "connection")
                    if key.lower() not in skip and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def options(self) -> dict[str, str]:
        return {"endpoint_override": self.endpoint, "scheme": "http"}

    def stop(self) -> None:
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
