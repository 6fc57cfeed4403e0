"""The web console: the token guards every data route, the page renders datasets and workers in
headless Chromium after a login, and half-sent requests neither block others nor keep threads."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest

from cachefs.master import console
from tests.procs import master_process, run_cli, worker_process

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000", "--window-size=1280,800",
]  # fmt: skip
DATA_ROUTES = ["/", "/api/status", "/api/datasets", "/api/jobs", "/no-such-page"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Plain HTTP requests to the console (redirects not followed); keeps every body it saw."""

    def __init__(self, port: int):
        self.port = port
        self.bodies: list[bytes] = []

    def get(self, path: str, headers: dict | None = None, method: str = "GET"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        self.bodies.append(body)
        return response.status, response.headers, body


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def stall(port: int) -> socket.socket:
    """A connection that sends half a request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\n")
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_console_token_page_and_limits(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (scripts/setup.sh installs it)")
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.bin").write_bytes(b"x" * 1000)
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(16))
    secret.chmod(0o600)
    auth = ["--secret-file", str(secret)]
    port = free_port()
    master = master_process(tmp_path, *auth, "--http", f"127.0.0.1:{port}")
    master.start()
    worker = worker_process(tmp_path, master.address, "gpu-node-7", "64M", *auth)
    client = Client(port)
    try:
        worker.start()
        cli = ["--master", master.address, *auth]
        added = run_cli("dataset", "add", "frames-demo", source.as_uri(), *cli)
        assert added.returncode == 0, added.stderr
        assert run_cli("load", "frames-demo", *cli).returncode == 0
        token_file = tmp_path / "master-state" / "console-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        url = run_cli("console-url", *cli)
        assert url.returncode == 0, url.stderr
        login_url = f"http://127.0.0.1:{port}/login?token={token}"
        assert url.stdout.strip() == login_url

        # No token, a wrong one, a forged cookie: 401 and no data, on every route.
        wrong = "x" * len(token)
        for headers in [{}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": "Bearer"},
                        {"Cookie": f"cachefs_console_{port}={token}"}]:  # fmt: skip
            for path in DATA_ROUTES:
                status, _, body = client.get(path, headers)
                assert status == 401, (path, headers, status)
                assert set(json.loads(body)) == {"error"}
        status, headers, _ = client.get(f"/login?token={wrong}")
        assert status == 401 and headers["Set-Cookie"] is None
        assert client.get("/login")[0] == 401

        # The Bearer header (scripts, curl).
        bearer = {"Authorization": f"Bearer {token}"}
        status, _, body = client.get("/api/status", bearer)
        assert status == 200
        data = json.loads(body)
        assert data["datasets"][0]["name"] == "frames-demo"
        assert data["datasets"][0]["cached_percent"] == 100.0
        assert data["workers"][0]["host"] == "gpu-node-7"
        assert json.loads(client.get("/api/datasets", bearer)[2])[0]["name"] == "frames-demo"
        assert isinstance(json.loads(client.get("/api/jobs", bearer)[2]), list)
        assert client.get("/no-such-page", bearer)[0] == 404
        status, headers, body = client.get("/", bearer)
        assert status == 200 and b"<title>cachefs</title>" in body
        assert "script-src 'sha256-" in headers["Content-Security-Policy"]
        assert client.get("/api/status", bearer, method="POST")[0] == 405
        assert client.get("/api/status", bearer, method="HEAD")[0] == 405

        # /login: a session cookie (not the token itself), then a redirect to the page.
        status, headers, _ = client.get(f"/login?token={token}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        attributes = [part.strip() for part in cookie.split(";")]
        assert {"Path=/", "HttpOnly", "SameSite=Strict"} <= set(attributes)
        session = attributes[0]
        assert session.startswith(f"cachefs_console_{port}=") and token not in session
        status, _, body = client.get("/api/status", {"Cookie": f"other=1; {session}"})
        assert status == 200 and json.loads(body)["workers"][0]["host"] == "gpu-node-7"
        # A wrong Bearer token decides even with the cookie; a proxy's Basic login does not.
        with_cookie = {"Cookie": session, "Authorization": f"Bearer {wrong}"}
        assert client.get("/api/status", with_cookie)[0] == 401
        with_cookie["Authorization"] = "Basic dXNlcjpwYXNz"
        assert client.get("/api/status", with_cookie)[0] == 200

        # Probes need no token and see no data.
        status, _, body = client.get("/healthz")
        assert (status, body) == (200, b"ok\n")

        # A browser logs in with the URL and the page's own fetches carry the cookie.
        profile = tmp_path / "chromium-profile"
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", login_url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert dom.returncode == 0, dom.stderr[-2000:]
        rendered = dom.stdout
        assert "<td>frames-demo</td>" in rendered
        assert "<td>gpu-node-7</td>" in rendered
        assert "<td>100.0%</td>" in rendered
        assert token not in rendered
        shot = tmp_path / "console.png"  # kept under the test tmp dir for a look
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
             login_url],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

        # Half-sent requests: they do not block a real one, and their threads go away.
        pid = master.proc.pid
        assert client.get("/api/status", bearer)[0] == 200
        baseline = threads(pid)
        stalled = [stall(port) for _ in range(40)]
        started = time.monotonic()
        status, _, _ = client.get("/api/status", bearer)
        assert status == 200 and time.monotonic() - started < 3
        assert threads(pid) >= baseline + 35  # the stalls are really held, one thread each
        # Up to the cap; beyond it a connection is answered 503 at once (connections are
        # accepted in order, so all stalls hold their slot when this one comes).
        stalled += [stall(port) for _ in range(console.MAX_CONNECTIONS - len(stalled))]
        assert time.monotonic() - started < console.REQUEST_TIMEOUT - 1
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert read_all(sock).startswith(b"HTTP/1.0 503 ")
        # Each stall is answered 408 and closed once the request timeout has passed.
        for sock in stalled:
            sock.settimeout(console.REQUEST_TIMEOUT + 5)
            assert read_all(sock).startswith(b"HTTP/1.0 408 ")
            sock.close()
        assert time.monotonic() - started < console.REQUEST_TIMEOUT + 5
        deadline = time.monotonic() + 5
        while threads(pid) > baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads(pid) <= baseline + 2
        assert client.get("/api/status", bearer)[0] == 200

        # An oversized request head is refused, not buffered (sent one byte over the limit, so
        # the server has read it all and closes without a reset).
        head = b"GET / HTTP/1.1\r\nX-Pad: "
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + b"a" * (console.MAX_HEAD_BYTES + 1 - len(head)))
            assert read_all(sock).startswith(b"HTTP/1.0 431 ")
    finally:
        worker.stop()
        master.stop()
    for body in client.bodies:
        assert token.encode() not in body
    assert token not in master.log()
