"""The console in-process: login_url names a reachable host (IPv6 in brackets) and carries the
token; /healthz reports an event loop that stops answering."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import trio

from cachefs.master import console as console_module
from cachefs.master.console import Console

TOKEN = "t" * 43


def login_url(host: str, *args) -> str:
    async def main():
        console = Console(None, host, 0, trio.lowlevel.current_trio_token(), token=TOKEN)
        try:
            return console.login_url(*args), console.address[1]
        finally:
            console.stop()

    url, port = trio.run(main)
    return url.replace(f":{port}/", ":PORT/")


def test_login_url_hosts():
    assert login_url("127.0.0.1") == f"http://127.0.0.1:PORT/login?token={TOKEN}"
    wildcard = f"http://{socket.gethostname()}:PORT/login?token={TOKEN}"
    assert login_url("0.0.0.0") == wildcard
    named = login_url("0.0.0.0", "master.example")
    assert named == f"http://master.example:PORT/login?token={TOKEN}"
    assert login_url("127.0.0.1", "master.example").startswith("http://127.0.0.1:")


def test_login_url_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        assert login_url("::1") == f"http://[::1]:PORT/login?token={TOKEN}"
    except OSError as exc:  # containers without an IPv6 loopback
        pytest.skip(f"cannot bind ::1: {exc}")


def test_short_token_refused():
    with pytest.raises(ValueError):
        Console(None, "127.0.0.1", 0, None, token="short")


def test_healthz_follows_the_event_loop():
    results = []

    def probe(port):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                results.append(r.status)
        except urllib.error.HTTPError as exc:
            results.append(exc.code)

    async def main():
        console = Console(None, "127.0.0.1", 0, trio.lowlevel.current_trio_token(), token=TOKEN)
        console.start()
        try:
            await trio.to_thread.run_sync(probe, console.address[1])
            blocked = threading.Thread(target=probe, args=(console.address[1],))
            blocked.start()
            time.sleep(console_module.HEALTH_TIMEOUT + 1)  # noqa: ASYNC251 - a stuck loop, on purpose
            await trio.to_thread.run_sync(blocked.join)
        finally:
            console.stop()

    trio.run(main)
    assert results == [200, 503]
