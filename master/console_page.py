"""The console's single page (HTML, CSS, JS) and the Content-Security-Policy that admits it.

The page polls /api/status every 2 s with a same-origin fetch, which sends the session cookie
set by /login. The CSP allows exactly this inline script and style (by hash) and fetches to the
console itself, so an injected value in a dataset name or URI cannot run or load anything.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 1.6em; }
 table { border-collapse: collapse; min-width: 60%; }
 th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 #error { color: #b00; }
"""

SCRIPT = """
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
  const error = document.getElementById("error");
  let r;
  try { r = await fetch("/api/status"); }
  catch (e) { error.textContent = "cannot reach the master: " + e; return; }
  if (r.status === 401) {
    error.textContent = "session expired: open the URL printed by `cachefs console-url` again";
    return;
  }
  if (!r.ok) { error.textContent = "the master answered " + r.status; return; }
  const s = await r.json();
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
  error.textContent = "";
}
refresh(); setInterval(refresh, 2000);
"""

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cachefs</title>
<style>{STYLE}</style></head>
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
<script>{SCRIPT}</script></body></html>
""".encode()


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE_CSP = (
    f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: For everything that is not the page (JSON, redirects, errors): nothing may load or frame it.
OTHER_CSP = "default-src 'none'; frame-ancestors 'none'"
