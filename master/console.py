"""The master's web console (`--http HOST:PORT`): a live page and the JSON API behind it.

    GET /                 the console page (refreshes itself every 2 s)
    GET /api/status       datasets (size, cached %, hit ratio), workers (tiers, liveness), jobs
    GET /api/datasets     the datasets alone
    GET /api/jobs         the load jobs alone

The HTTP server runs in its own threads (the standard library's ThreadingHTTPServer) and asks
the trio side for data with trio.from_thread, so the event loop never blocks on a browser.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trio

from cachefs.errors import CacheFsError

log = logging.getLogger("cachefs.master.console")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cachefs</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 1.6em; }
 table { border-collapse: collapse; min-width: 60%; }
 th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 .bar { display: inline-block; height: 8px; background: #3a7; vertical-align: middle; }
 #error { color: #b00; }
</style></head>
<body>
<h1>cachefs <span id="version"></span></h1>
<div id="error"></div>
<h2>Datasets</h2>
<table id="datasets"><thead><tr><th>name</th><th>files</th><th>size</th><th>cached</th>
<th>hit ratio</th><th>last sync</th><th>uri</th></tr></thead><tbody></tbody></table>
<h2>Workers (epoch <span id="epoch"></span>)</h2>
<table id="workers"><thead><tr><th>id</th><th>address</th><th>host</th><th>tiers used / size</th>
<th>hits</th><th>misses</th><th>last seen</th></tr></thead><tbody></tbody></table>
<h2>Jobs</h2>
<table id="jobs"><thead><tr><th>id</th><th>dataset</th><th>state</th><th>progress</th>
<th>cached already</th><th>failed</th><th>runs</th></tr></thead><tbody></tbody></table>
<script>
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows.map(cells => {
    const tr = document.createElement("tr"); cells.forEach(c => tr.appendChild(cell(c))); return tr;
  }));
}
async function refresh() {
  try {
    const s = await (await fetch("/api/status")).json();
    document.getElementById("version").textContent = s.version;
    document.getElementById("epoch").textContent = s.epoch;
    const pct = x => (100 * x).toFixed(1) + "%";
    fill("datasets", s.datasets.map(d => [d.name, d.files, bytes(d.bytes),
      d.cached_percent.toFixed(1) + "%", d.hit_ratio === null ? "-" : pct(d.hit_ratio),
      d.last_sync ? new Date(d.last_sync.at * 1000).toLocaleString() : "never", d.uri]));
    const tiers = w => Object.entries(w.stats.tiers || {})
      .map(([t, v]) => t + " " + bytes(v.used) + " / " + bytes(v.capacity)).join(", ");
    fill("workers", s.workers.map(w => [w.id, w.address, w.host, tiers(w),
      w.stats.hits ?? "-", w.stats.misses ?? "-", Math.round(s.now - w.last_seen) + " s ago"]));
    fill("jobs", s.jobs.map(j => [j.id, j.dataset, j.state,
      j.progress.done_files + " / " + j.progress.files, j.progress.cached_files,
      j.progress.failed_files, j.runs]));
    document.getElementById("error").textContent = "";
  } catch (e) { document.getElementById("error").textContent = "cannot reach the master: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


class Console:
    """Serves the console for `service` (a MasterService) until `stop()`."""

    def __init__(self, service, host: str, port: int, trio_token: trio.lowlevel.TrioToken):
        self.service = service
        self.token = trio_token
        console = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - the standard library's name
                routes = {
                    "/": console.page,
                    "/api/status": console.status,
                    "/api/datasets": lambda: console._part("datasets"),
                    "/api/jobs": lambda: console._part("jobs"),
                }
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    return self._send(404, "application/json", b'{"error": "not found"}')
                try:
                    content_type, body = route()
                except CacheFsError as exc:
                    body = json.dumps({"error": exc.message}).encode()
                    return self._send(503, "application/json", body)
                self._send(200, content_type, body)

            def _send(self, code: int, content_type: str, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("console on http://%s:%s/", *self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def page(self) -> tuple[str, bytes]:
        return "text/html; charset=utf-8", PAGE.encode()

    def _snapshot(self) -> dict:
        return trio.from_thread.run(self.service.rpc_status, trio_token=self.token)

    def status(self) -> tuple[str, bytes]:
        return "application/json", json.dumps(self._snapshot(), default=str).encode()

    def _part(self, key: str) -> tuple[str, bytes]:
        return "application/json", json.dumps(self._snapshot()[key], default=str).encode()
