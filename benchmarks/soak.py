"""Does a cluster mount keep serving every byte right while workers keep dying?

A bounded soak on one host: a master and 3 workers as processes on 127.0.0.1 (tests/procs.py),
a dataset of small files in a local directory (file://), and a cluster-mode mount read by
8 threads in an epoch loop; each file is verified against its sha256 and its pages dropped from
the page cache after the read, so every read goes through the mount to a worker
(tests/cluster/readers.py). Meanwhile a chaos loop kills a random live worker every 1-4 s
(SIGKILL, or SIGTERM one time in three; never the last one alive), leaves it down for 0.5-15 s
(long enough, at times, for the master to drop it) and starts it again with the same state, so
one or two workers are often down at once.

    python benchmarks/soak.py                       # 2 minutes
    python benchmarks/soak.py --minutes 10 --files 3000

Prints files read, epochs, reader errors, wrong bytes (both must be 0: the exit code is 1
otherwise) and read latency percentiles; `--results benchmarks/results.md` also replaces the
"Soak (soak.py)" section of that file.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import replace_section  # noqa: E402
from tests.cluster.readers import Readers, ReadReport  # noqa: E402
from tests.fuse.conftest import make_files  # noqa: E402
from tests.procs import ServiceProcess, master_process, run_cli, worker_process  # noqa: E402

WORKERS = 3


def chaos(workers: list[ServiceProcess], until: float, rng: random.Random, log) -> dict[str, int]:
    """Kills random workers and restarts them after a random downtime until `until` (at most
    all but one down at once); returns the counts. Ends with every worker running."""
    counts = {"SIGKILL": 0, "SIGTERM": 0, "restarts": 0, "long_downtimes": 0, "most_down": 0}
    down: dict[int, float] = {}  # index of a dead worker -> when it comes back
    next_kill = time.monotonic() + rng.uniform(1.0, 4.0)
    while True:
        now = time.monotonic()
        for i, back in sorted(down.items(), key=lambda kv: kv[1]):
            if back <= now or now >= until:
                workers[i].start()  # returns once it listens again
                counts["restarts"] += 1
                del down[i]
        if now >= until:
            return counts
        alive = [i for i in range(len(workers)) if i not in down]
        if now >= next_kill:
            if len(alive) > 1:
                i = rng.choice(alive)
                sig = signal.SIGTERM if rng.random() < 1 / 3 else signal.SIGKILL
                workers[i].stop(sig)
                downtime = rng.uniform(0.5, 15.0)
                down[i] = time.monotonic() + downtime
                counts[sig.name] += 1
                counts["long_downtimes"] += downtime > 10.0  # past the master's liveness
                counts["most_down"] = max(counts["most_down"], len(down))
                log(f"w{i + 1}: {sig.name}, down {downtime:.1f}s ({len(down)} down)")
            next_kill = time.monotonic() + rng.uniform(1.0, 4.0)
        wake = min([next_kill, until, *down.values()])
        time.sleep(max(0.0, wake - time.monotonic()))  # the chaos schedule, not a readiness wait


def soak(minutes: float, files: int, threads: int, seed: int, work: Path) -> dict:
    source = work / "source"
    digests = make_files(source, files, max_size=32_768, seed=seed)
    master = master_process(work)
    master.start()
    workers = [worker_process(work, master.address, f"w{i + 1}", "128M") for i in range(WORKERS)]
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    try:
        for w in workers:
            w.start()
        added = run_cli("dataset", "add", "soak", source.as_uri(), "--master", master.address)
        assert added.returncode == 0, added.stderr
        mounted = run_cli("mount", "soak", str(mountpoint), "--master", master.address)
        assert mounted.returncode == 0, mounted.stderr
        readers = Readers(
            mountpoint, digests, threads=threads, seed=seed,
            expected=lambda rel: (source / rel).read_bytes(),
        ).start()  # fmt: skip
        counts = chaos(workers, time.monotonic() + 60 * minutes, random.Random(seed), log)
        report: ReadReport = readers.finish(timeout=120)
        status = run_cli("status", "--json", "--master", master.address)
        (info,) = json.loads(status.stdout)["datasets"]
        cached_percent = info["cached_percent"]
        stored_percent = 100 * info.get("stored_bytes", 0) / info["bytes"] if info["bytes"] else 0
    finally:
        run_cli("umount", str(mountpoint))
        for w in workers:
            w.stop()
        master.stop()
    return {"report": report, "counts": counts, "files": files, "threads": threads,
            "minutes": minutes, "cached_percent": cached_percent,
            "stored_percent": stored_percent}  # fmt: skip


def markdown(result: dict) -> str:
    r: ReadReport = result["report"]
    c = result["counts"]
    return f"""\
`python benchmarks/soak.py --minutes {result["minutes"]:g}`: a master and {WORKERS} workers as processes on
127.0.0.1, {result["files"]:,} files of 0-32 KiB in a local directory (file://), one cluster-mode
mount read by {result["threads"]} threads in an epoch loop (every file checked against its sha256,
its pages dropped after the read so that each read reaches a worker). Meanwhile a random live
worker is killed every 1-4 s (SIGKILL, or SIGTERM one time in three; never the last one alive),
left down 0.5-15 s (past the master's 10 s liveness at times, so it is dropped and rejoins) and
restarted with its state and port.

| minutes | files read | epochs | kills (SIGKILL / SIGTERM) | down > 10 s | most down at once | reader errors | wrong bytes | read p50 | read p99 | read max |
|---|---|---|---|---|---|---|---|---|---|---|
| {r.seconds / 60:.1f} | {r.files:,} | {r.epochs} | {c["SIGKILL"]} / {c["SIGTERM"]} | {c["long_downtimes"]} | {c["most_down"]} | {len(r.errors)} | {r.wrong_bytes} | {1000 * r.p50:.1f} ms | {1000 * r.p99:.1f} ms | {1000 * r.max:.0f} ms |

On one host a dead worker refuses connections at once, so a read that meets one falls through
to the next-ranked worker without waiting; a hung or unreachable worker costs the 20 s worker
deadline instead (tests/cluster/test_faults.py). After the run, `cachefs status` showed
{result["cached_percent"]:.0f}% of the dataset cached on its owners, and {result["stored_percent"]:.0f}% of its bytes stored
in all: the workers that took over a dead one's files kept their copies.
"""  # noqa: E501


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="write the section into this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cachefs-soak-") as tmp:
        result = soak(args.minutes, args.files, args.threads, args.seed, Path(tmp))
    report: ReadReport = result["report"]
    print(report.summary())
    print(f"chaos: {result['counts']}; {result['cached_percent']:.0f}% cached on owners, "
          f"{result['stored_percent']:.0f}% stored at the end")  # fmt: skip
    if report.errors:
        print(f"first errors: {report.errors[:10]}")
    if args.results:
        replace_section(args.results, "Soak (soak.py)", markdown(result))
    return 0 if not report.errors and not report.wrong_files else 1


if __name__ == "__main__":
    sys.exit(main())
