"""The web console renders datasets and workers in headless Chromium; the JSON API answers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request

import pytest

from tests.procs import master_process, run_cli, worker_process

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000", "--window-size=1280,800",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_page_and_api(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (scripts/setup.sh installs it)")
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.bin").write_bytes(b"x" * 1000)
    port = free_port()
    master = master_process(tmp_path, "--http", f"127.0.0.1:{port}")
    master.start()
    worker = worker_process(tmp_path, master.address, "gpu-node-7", "64M")
    try:
        worker.start()
        assert run_cli("dataset", "add", "frames-demo", source.as_uri(), "--master",
                       master.address).returncode == 0  # fmt: skip
        assert run_cli("load", "frames-demo", "--master", master.address).returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as r:
            status = json.load(r)
        assert status["datasets"][0]["name"] == "frames-demo"
        assert status["datasets"][0]["cached_percent"] == 100.0
        assert status["workers"][0]["host"] == "gpu-node-7"

        profile = tmp_path / "chromium-profile"
        url = f"http://127.0.0.1:{port}/"
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert dom.returncode == 0, dom.stderr[-2000:]
        rendered = dom.stdout
        assert "<td>frames-demo</td>" in rendered
        assert "<td>gpu-node-7</td>" in rendered
        assert "<td>100.0%</td>" in rendered

        shot = tmp_path / "console.png"  # kept under the test tmp dir for a look
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        worker.stop()
        master.stop()
