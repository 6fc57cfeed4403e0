"""`cachefs dataset add|sync|ls|clean|rm`."""

from __future__ import annotations

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
        click.echo(
            f"{info['name']}\t{info['uri']}\t{info['files']} files\t{human_bytes(info['bytes'])}"
        )


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
