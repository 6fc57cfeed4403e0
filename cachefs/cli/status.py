"""`cachefs status` and `cachefs affinity`."""

from __future__ import annotations

import json
from datetime import datetime

import click

from cachefs.cli.app import main
from cachefs.cli.common import (
    call_master,
    errors_to_exit,
    human_bytes,
    master_option,
    secret_option,
)
from cachefs.cli.datasets import controls_text
from cachefs.cli.jobs import job_line
from cachefs.errors import CacheFsError


@main.command()
@click.argument("name")
@click.option("--k8s", is_flag=True, help="print a preferred nodeAffinity block")
@master_option
@secret_option
@errors_to_exit
def affinity(name, k8s, master, secret_file) -> None:
    """Worker hosts ranked by their cached share of dataset NAME."""
    ranked = call_master(master, secret_file, "affinity", dataset=name)
    if not k8s:
        for row in ranked:
            click.echo(
                f"{row['host']:<24} {human_bytes(row['cached_bytes']):>12} "
                f"{100 * row['share']:6.1f}% of cached "
                f"{100 * row['dataset_share']:6.1f}% of dataset"
            )
        return
    import yaml

    terms = [
        {
            "weight": max(1, round(100 * row["share"])),
            "preference": {
                "matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [row["host"]]}
                ]
            },
        }  # fmt: skip
        for row in ranked
        if row["cached_bytes"]
    ]
    click.echo(f"# cachefs: hosts holding dataset {name}, weighted by cached share.")
    click.echo("# Worker --host-id must equal the node's kubernetes.io/hostname label.")
    click.echo(yaml.safe_dump(
        {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": terms}}},
        sort_keys=False,
    ).rstrip())  # fmt: skip


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@master_option
@secret_option
@errors_to_exit
def status(name, as_json, master, secret_file) -> None:
    """Datasets (files, bytes, last sync) and live workers."""
    report = call_master(master, secret_file, "status")
    if name is not None:
        report["datasets"] = [d for d in report["datasets"] if d["name"] == name]
        if not report["datasets"]:
            raise CacheFsError(f"unknown dataset {name!r}")
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(f"datasets ({len(report['datasets'])}):")
    for info in report["datasets"]:
        synced = info.get("last_sync") or {}
        when = (
            datetime.fromtimestamp(synced["at"]).isoformat(timespec="seconds")
            if synced
            else "never"
        )
        hit = info.get("hit_ratio")
        click.echo(
            f"  {info['name']:<16} {info['files']:>9} files {human_bytes(info['bytes']):>10}"
            f"  {info['cached_percent']:.1f}% cached"
            f"  hit ratio {'-' if hit is None else f'{100 * hit:.1f}%'}"
            f"  synced {when}  {info['uri']}"
            + (f"  ({shown})" if (shown := controls_text(info.get("controls") or {})) else "")
        )
    click.echo(f"workers ({len(report['workers'])}, epoch {report['epoch']}):")
    for worker in report["workers"]:
        tiers = worker["stats"].get("tiers", {})
        usage = ", ".join(
            f"{name} {human_bytes(t['used'])}/{human_bytes(t['capacity'])}"
            for name, t in tiers.items()
        )
        click.echo(f"  {worker['id']:<14} {worker['address']:<22} host {worker['host']}  {usage}")
    jobs = [j for j in report.get("jobs", []) if name is None or j["dataset"] == name]
    if jobs:
        click.echo(f"jobs ({len(jobs)}):")
        for item in jobs:
            click.echo(f"  {job_line(item)}")
