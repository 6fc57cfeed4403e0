"""One training host's epoch, as MLPerf Storage (DLIO) emulates it: run by seed_scenario.py inside
a host's network namespace.

`--threads` reader threads take the host's files in order (its shard of the epoch), verify each
against the manifest, and fill batches of `--batch` files into a queue at most
`--prefetch-batches` deep (a DataLoader's workers and prefetch); the "accelerator" takes batch
after batch and sleeps `--compute-ms` per batch. Reads come from HDFS directly (hdfs-native in
this process, `--source hdfs://...`, `--config k=v` client settings) or from a directory (a
cachefs mount; unbuffered reads: one open, read, close per file).

Prints one JSON line: seconds, files, bytes, compute seconds, errors and the first one. A run
stops at its first read error (a training job dies on it) or after `--give-up` seconds.

    python -m benchmarks.train_reader --manifest M --files SHARD --source S [--threads 8] ...
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import xxhash

from benchmarks.dataset import load_manifest


def hdfs_read(source: str, config: dict[str, str]):
    from hdfs_native import Client

    root = source.split("://", 1)[1].split("/", 1)
    client = Client(f"hdfs://{root[0]}", config)
    prefix = "/" + (root[1] if len(root) > 1 else "")

    def read(rel: str) -> bytes:
        with client.read(f"{prefix.rstrip('/')}/{rel}") as f:
            return f.read()

    return read


def dir_read(root: Path):
    def read(rel: str) -> bytes:
        with open(root / rel, "rb", buffering=0) as f:
            return f.readall()

    return read


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--files", type=Path, required=True, help="this host's files, one per line")
    p.add_argument("--source", required=True, help="hdfs://HOST:PORT/ROOT or a directory")
    p.add_argument("--config", action="append", default=[], help="hdfs-native setting k=v")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prefetch-batches", type=int, default=4)
    p.add_argument("--compute-ms", type=float, default=0.0, help="accelerator time per batch")
    p.add_argument("--give-up", type=float, default=3600.0, help="seconds before it counts as hung")
    args = p.parse_args()
    _, manifest = load_manifest(args.manifest)
    files = args.files.read_text().split()
    if args.source.startswith("hdfs://"):
        config = dict(kv.split("=", 1) for kv in args.config)
        read = hdfs_read(args.source, config)
    else:
        read = dir_read(Path(args.source))

    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "errors": 0, "first_error": None}
    batches: queue.Queue = queue.Queue(args.prefetch_batches)
    n_batches = (len(files) + args.batch - 1) // args.batch
    pending: dict[int, int] = {}  # batch -> files still to read

    def reader() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= len(files) or state["errors"]:
                    return
                state["next"] += 1
            rel = files[i]
            try:
                data = read(rel)
                size, digest = manifest[rel]
                if len(data) != size or xxhash.xxh3_64_intdigest(data) != digest:
                    raise OSError(f"{rel}: wrong content ({len(data)} bytes, expected {size})")
            except Exception as exc:  # a training job dies on its first read error
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or f"{rel}: {exc}"[:300]
                batches.put(None)
                return
            with lock:
                state["bytes"] += len(data)
                b = i // args.batch
                pending[b] = pending.get(b, min(args.batch, len(files) - b * args.batch)) - 1
                full = pending[b] == 0
            if full:
                batches.put(b)  # blocks while the accelerator is this many batches behind

    started = time.perf_counter()
    deadline = started + args.give_up
    for _ in range(args.threads):
        threading.Thread(target=reader, daemon=True).start()
    computed, done, hung = 0.0, 0, False
    while done < n_batches:
        try:
            b = batches.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            hung = True
            break
        if b is None:
            break
        time.sleep(args.compute_ms / 1000)
        computed += args.compute_ms / 1000
        done += 1
    seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds, "files": min(done * args.batch, len(files)), "bytes": state["bytes"],
        "compute": computed, "errors": state["errors"], "first_error": state["first_error"],
        "hung": hung, "complete": done == n_batches,
    }), flush=True)  # fmt: skip
    sys.stdout.flush()
    os._exit(0)  # reader threads may still be blocked in a hung read


if __name__ == "__main__":
    main()
