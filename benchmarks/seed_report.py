"""The results.md section and chart of benchmarks/seed_scenario.py (kept apart: the scenario's
module runs processes, this one only formats what they measured)."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.results import median_range, rerun_command

CHART = Path(__file__).resolve().parent / "seed-scenario.png"


def render(s, shape, desc: dict, machine: str) -> str:
    a = s.args
    lines = [
        f"`{rerun_command('benchmarks/seed_scenario.py')}` on {machine}.",
        "",
        f"Dataset: {desc['files']:,} rawframes-like files in {desc['dirs']:,} directories, "
        f"{desc['bytes'] / 1e6:,.0f} MB (median {desc['median'] / 1e3:.0f} KB), in a real HDFS "
        f"2.7.3 (NameNode + 3 DataNodes, replication 3) reached through relays that add "
        f"{a.latency_ms:g} ms to every answer and let each DataNode send {a.datanode_mbps:g} MB/s "
        f"to this job. Each host: {a.threads} reader threads, batches of {a.batch}, "
        f"{a.compute_ms:g} ms of emulated accelerator time per batch (DLIO-style; utilization = "
        f"compute / epoch). Direct = hdfs-native in the training process (cachefs's client "
        f"settings); cachefs = the host's cluster mount after `cachefs load` (H workers, RAM "
        f"tiers in /dev/shm). Epoch = until the last host ends; {a.rounds} rounds, median [range].",
        "",
        "| hosts | direct epoch s | direct util | cachefs epoch s | cachefs util | speedup "
        "| `cachefs load` s (files/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    speedups = {}
    for hosts in (1, 2, 3):
        direct = s.epochs.get(("direct", hosts), [])
        cached = s.epochs.get(("cachefs", hosts), [])
        if not direct or not cached:
            continue
        ratios = [d["seconds"] / c["seconds"] for d, c in zip(direct, cached, strict=False)]
        speedups[hosts] = ratios
        load = s.loads[hosts]
        lines.append(
            f"| {hosts} | {median_range([d['seconds'] for d in direct], '.1f')} "
            f"| {median_range([d['utilization'] * 100 for d in direct], '.0f')}% "
            f"| {median_range([c['seconds'] for c in cached], '.1f')} "
            f"| {median_range([c['utilization'] * 100 for c in cached], '.0f')}% "
            f"| **{median_range(ratios, '.1f')}x** "
            f"| {load['seconds']:.0f} ({load['files_s']:,.0f}) |"
        )
    errors = sum(e["errors"] for runs in s.epochs.values() for e in runs)
    lines += ["", f"Reader errors in these epochs: {errors}; every byte checked (xxh3).", ""]
    if s.jobs:
        lines += [
            "Job success (a job = one epoch on 3 hosts; it fails at its first read error or past "
            "3x its fault-free epoch). Faults: `pause` = a DataNode SIGSTOPped at 10-40% of the "
            + ("epoch until the run ends" if not a.pause_s else f"epoch for {a.pause_s:g} s")
            + "; `kill` = a DataNode SIGKILLed at 10-40% (restarted after the run).",
            "",
            "| reader | fault | jobs ok | epoch s (runs) | first error |",
            "|---|---|---:|---|---|",
        ]
        for (system, fault), runs in s.jobs.items():
            ok = sum(r["ok"] for r in runs)
            times = ", ".join(
                f"{r['seconds']:.0f}{'' if r['ok'] else ' (hung)' if r['hung'] else ' (failed)'}"
                for r in runs
            )
            first = next((r["first_error"] for r in runs if r["first_error"]), "") or ""
            lines.append(
                f"| {system} | {fault} | {ok}/{len(runs)} ({ok / len(runs):.0%}) | {times} "
                f"| {first[:80]} |"
            )
        lines.append("")
    if speedups:
        chart(s, speedups)
        lines.append(f"![seed scenario]({CHART.name})")
    return "\n".join(lines) + "\n"


def chart(s, speedups: dict[int, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = sorted(speedups)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system, color in (("direct", "tab:red"), ("cachefs", "tab:blue")):
        med = [statistics.median(e["seconds"] for e in s.epochs[(system, h)]) for h in hosts]
        left.plot(hosts, med, "o-", color=color, label=system)
    left.set(xlabel="training hosts", ylabel="epoch seconds (median)", xticks=hosts,
             title="Epoch time")  # fmt: skip
    left.legend()
    right.bar(hosts, [statistics.median(speedups[h]) for h in hosts], color="tab:blue")
    right.set(xlabel="training hosts", ylabel="x direct HDFS", xticks=hosts,
              title="cachefs speedup over direct HDFS")  # fmt: skip
    fig.tight_layout()
    fig.savefig(CHART, dpi=90)
    plt.close(fig)
