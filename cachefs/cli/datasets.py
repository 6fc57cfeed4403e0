"""`cachefs dataset add|sync|ls|clean|rm|pin|unpin|set`."""

from __future__ import annotations

import math

import click

from cachefs.cli.app import main
from cachefs.cli.common import (
    call_master,
    errors_to_exit,
    human_bytes,
    master_option,
    parse_options,
    secret_option,
)
from cachefs.cli.jobs import parse_duration
from cachefs.config import parse_size
from cachefs.errors import InvalidArgument


@main.group()
def dataset() -> None:
    """Add, list, sync and remove datasets."""


@dataset.command("add")
@click.argument("name")
@click.argument("uri")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="store option")
@click.option("--no-sync", is_flag=True, help="register only; do not list the remote tree now")
@master_option
@secret_option
@errors_to_exit
def dataset_add(name, uri, options, no_sync, master, secret_file) -> None:
    """Register NAME for URI (file://, s3://, hdfs://, webhdfs://) and sync its metadata."""
    opts = parse_options(options)
    call_master(master, secret_file, "dataset_add", name=name, uri=uri, options=opts)
    if no_sync:
        click.echo(f"dataset {name} added")
        return
    report = call_master(master, secret_file, "dataset_sync", name=name)
    click.echo(f"dataset {name} added: {_sync_line(report)}")


def _sync_line(report: dict) -> str:
    return (
        f"{report['files']} files, {human_bytes(report['bytes'])}; "
        f"added {report['added']}, changed {report['changed']}, removed {report['removed']} "
        f"in {report['seconds']:.2f}s"
    )


@dataset.command("sync")
@click.argument("name")
@master_option
@secret_option
@errors_to_exit
def dataset_sync(name, master, secret_file) -> None:
    """Re-list the remote tree: new files appear, changed ones get a new version."""
    report = call_master(master, secret_file, "dataset_sync", name=name)
    click.echo(f"dataset {name} synced: {_sync_line(report)}")


@dataset.command("ls")
@master_option
@secret_option
@errors_to_exit
def dataset_ls(master, secret_file) -> None:
    """List datasets."""
    for info in call_master(master, secret_file, "dataset_list"):
        line = f"{info['name']}\t{info['uri']}\t{info['files']} files\t{human_bytes(info['bytes'])}"
        shown = controls_text(info.get("controls") or {})
        click.echo(f"{line}\t{shown}" if shown else line)


@dataset.command("clean")
@click.argument("name")
@master_option
@secret_option
@errors_to_exit
def dataset_clean(name, master, secret_file) -> None:
    """Drop the dataset's cached data on every worker (metadata stays)."""
    result = call_master(master, secret_file, "dataset_clean", name=name)
    click.echo(f"dataset {name}: {result['evicted']} cache entries dropped on "
               f"{result['workers']} workers")  # fmt: skip


@dataset.command("rm")
@click.argument("name")
@master_option
@secret_option
@errors_to_exit
def dataset_rm(name, master, secret_file) -> None:
    """Remove a dataset's metadata (the remote store is never touched)."""
    call_master(master, secret_file, "dataset_remove", name=name)
    click.echo(f"dataset {name} removed")


def duration_text(seconds: float) -> str:
    """7200 -> '2h', 90 -> '90s', 1.5 -> '1.5s'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:g}s"


def controls_text(controls: dict) -> str:
    """'pinned, quota 1.0 GiB, ttl 2h'; '' when a dataset has none."""
    parts = ["pinned"] if controls.get("pinned") else []
    if controls.get("quota_bytes") is not None:
        parts.append(f"quota {human_bytes(controls['quota_bytes'])}")
    if controls.get("ttl_seconds") is not None:
        parts.append(f"ttl {duration_text(controls['ttl_seconds'])}")
    return ", ".join(parts)


def _set_controls(master, secret_file, name: str, changes: dict) -> None:
    result = call_master(master, secret_file, "dataset_set", name=name, changes=changes)
    shown = controls_text(result["controls"]) or "no pin, quota or ttl"
    workers, applied = result["workers"], result["applied"]
    if not workers:
        where = "no live workers; each applies it when it registers"
    elif applied == workers:
        where = f"applied on {workers} worker{'s' if workers != 1 else ''}"
    else:
        where = f"applied on {applied} of {workers} workers, the others at their next heartbeat"
    click.echo(f"dataset {name}: {shown} ({where})")


@dataset.command("pin")
@click.argument("name")
@master_option
@secret_option
@errors_to_exit
def dataset_pin(name, master, secret_file) -> None:
    """Never evict NAME's cached files, on every worker (persisted on the master)."""
    _set_controls(master, secret_file, name, {"pinned": True})


@dataset.command("unpin")
@click.argument("name")
@master_option
@secret_option
@errors_to_exit
def dataset_unpin(name, master, secret_file) -> None:
    """Let NAME's cached files be evicted again."""
    _set_controls(master, secret_file, name, {"pinned": False})


def _quota(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        quota = parse_size(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--quota: {exc.message}") from None
    if quota <= 0:
        raise InvalidArgument("--quota must be a positive size, or none")
    return quota


def _ttl(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        ttl = parse_duration(text.strip())
    except InvalidArgument as exc:
        raise InvalidArgument(f"--ttl: {exc.message}") from None
    if not (math.isfinite(ttl) and ttl > 0):
        raise InvalidArgument("--ttl must be a positive duration, or none")
    return ttl


@dataset.command("set")
@click.argument("name")
@click.option(
    "--quota",
    metavar="SIZE|none",
    help="at most this much of the cluster's cache (split over the live workers)",
)
@click.option(
    "--ttl",
    metavar="DURATION|none",
    help="drop cached files this long after they were stored (90s, 15m, 2h, 1d)",
)
@master_option
@secret_option
@errors_to_exit
def dataset_set(name, quota, ttl, master, secret_file) -> None:
    """Set or clear (none) NAME's cache quota and TTL, on every worker (persisted)."""
    changes = {}
    if quota is not None:
        changes["quota_bytes"] = _quota(quota)
    if ttl is not None:
        changes["ttl_seconds"] = _ttl(ttl)
    if not changes:
        raise InvalidArgument("nothing to set: give --quota SIZE|none and/or --ttl DURATION|none")
    _set_controls(master, secret_file, name, changes)
