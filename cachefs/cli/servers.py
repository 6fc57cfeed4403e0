"""`cachefs master` (and `master backup`), `cachefs worker`, `cachefs console-url`."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from pathlib import Path

import click
import trio

from cachefs.cli.app import main
from cachefs.cli.common import (
    call_master,
    current_tls,
    errors_to_exit,
    human_bytes,
    master_option,
    metrics_option,
    secret_option,
    serve_until_signal,
    shm_options,
)
from cachefs.config import format_address, master_address, parse_address, parse_size
from cachefs.credentials import client_secret, server_secret
from cachefs.errors import InvalidArgument


@main.group(invoke_without_command=True)
@click.option("--listen", default="127.0.0.1:19470", show_default=True, metavar="HOST:PORT")
@click.option("--state", type=click.Path(file_okay=False), help="state directory (required)")
@click.option("--restore", type=click.Path(dir_okay=False, exists=True),
              help="start from a backup file (the state directory must be new)")  # fmt: skip
@secret_option
@metrics_option
@click.option("--http", metavar="HOST:PORT", help="serve the web console and JSON API here")
@click.option(
    "--liveness", default=10.0, show_default=True, help="seconds before a silent worker is dropped"
)
@click.option("--insecure", is_flag=True, help="no authentication: anyone reaching it reads all")
@click.pass_context
@errors_to_exit
def master(ctx, listen, state, restore, secret_file, metrics, http, liveness, insecure) -> None:
    """Run the metadata master (foreground); `cachefs master backup NAME` copies its state.

    Clients and workers must prove they hold the cluster's shared secret: --secret-file, or
    by default STATE/secret, created on first start (0600). Clients run by the same user on
    this host find it without a flag; give it to workers and clients elsewhere.
    """
    if ctx.invoked_subcommand is not None:
        return
    from cachefs import metrics as prometheus
    from cachefs.master.namespace import restore_backup
    from cachefs.master.service import run_master

    if state is None:
        raise click.UsageError("Missing option '--state'.")
    if restore:
        restore_backup(restore, state)
    if insecure and secret_file:
        raise InvalidArgument("--insecure and --secret-file exclude each other")
    prometheus.serve(metrics)
    if insecure:
        secret = None
        logging.getLogger("cachefs.master").warning(
            "running without authentication (--insecure): anyone who can reach %s can read "
            "every dataset and change the cluster",
            listen,
        )
    else:
        secret, _ = server_secret(secret_file, Path(state))
    address = parse_address(listen)
    service = functools.partial(
        run_master, address, state, secret=secret, publish_secret=True, tls=current_tls(),
        liveness=liveness,
        http=parse_address(http) if http else None,
    )  # fmt: skip
    trio.run(serve_until_signal, service, "master")


@master.command("backup")
@click.argument("name", default="")
@master_option
@secret_option
@errors_to_exit
def master_backup(name, master, secret_file) -> None:
    """Write a consistent copy of a running master's state to STATE/backups/NAME.

    The master writes only inside its own state dir (default NAME: meta-<date>.lmdb); copy the
    file from there.
    """
    name = name or datetime.now().strftime("meta-%Y%m%d-%H%M%S.lmdb")
    result = call_master(master, secret_file, "backup", path=name)
    click.echo(f"backup of {result['datasets']} datasets written to {result['path']} "
               f"({human_bytes(result['bytes'])})")  # fmt: skip


@main.command()
@master_option
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT")
@click.option("--advertise", metavar="HOST:PORT", help="address clients use (default: --listen)")
@click.option("--state", required=True, type=click.Path(file_okay=False), help="index and id")
@click.option("--mem", default="1G", show_default=True, help="RAM tier size (0 for none)")
@click.option("--disk", type=click.Path(file_okay=False), help="directory for the DISK tier")
@click.option("--disk-size", default="0", help="DISK tier size, e.g. 100G")
@click.option("--host-id", help="node name for locality (default: hostname)")
@click.option("--high-watermark", type=float, default=1.0, show_default=True,
              help="evict once a tier is fuller than this share of its size")  # fmt: skip
@click.option("--low-watermark", type=float, default=0.97, show_default=True,
              help="evict down to this share (0 < low <= high <= 1)")  # fmt: skip
@shm_options
@click.option("--insecure", is_flag=True, help="serve without a secret (the master's --insecure)")
@click.option("--fills", type=click.IntRange(min=1), default=None,
              help="remote reads at once; the store's best parallel GET count per worker "
                   "[default: 32]")  # fmt: skip
@secret_option
@metrics_option
@errors_to_exit
def worker(
    master, listen, advertise, state, mem, disk, disk_size, host_id, high_watermark,
    low_watermark, shm, shm_share, insecure, fills, secret_file, metrics,
):  # fmt: skip
    """Run a cache worker (foreground).

    Its port serves cached data: it needs the cluster's secret (--secret-file, or the one the
    master published on this host), unless --insecure.
    """
    from cachefs import metrics as prometheus
    from cachefs.worker.service import run_worker
    from cachefs.worker.store import BlockStore

    if disk and not parse_size(disk_size):
        raise InvalidArgument("--disk needs --disk-size")
    if not 0 < low_watermark <= high_watermark <= 1:
        raise InvalidArgument(
            f"watermarks need 0 < --low-watermark <= --high-watermark <= 1 "
            f"(got low {low_watermark:g}, high {high_watermark:g})"
        )
    secret = client_secret(secret_file, master_address(master))
    if secret is None and not insecure:
        raise InvalidArgument(
            f"no cluster secret for the master at {format_address(master_address(master))}: "
            "pass --secret-file F (a 0600 copy of the master's STATE/secret) or set "
            "$CACHEFS_SECRET_FILE (--insecure only if the master runs without authentication)"
        )
    prometheus.serve(metrics)
    store = BlockStore(
        Path(state),
        mem_capacity=parse_size(mem),
        disk_dir=Path(disk) if disk else None,
        disk_capacity=parse_size(disk_size),
        shm_dir=Path(shm),
        shm_share=shm_share,
        high=high_watermark,
        low=low_watermark,
    )
    started = False

    async def service(task_status=trio.TASK_STATUS_IGNORED):
        nonlocal started
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(worker_service)
            started = True
            task_status.started(bound)

    worker_service = functools.partial(
        run_worker,
        master_address(master),
        parse_address(listen),
        store,
        advertise=advertise,
        host_id=host_id,
        secret=secret,
        tls=current_tls(),
        fill_parallelism=fills,
    )
    try:
        trio.run(serve_until_signal, service, "worker")
    finally:  # a stopped worker keeps its tiers for its restart; a failed start removes its own
        store.close(remove=() if started else store.created)


@main.command("console-url")
@master_option
@secret_option
@errors_to_exit
def console_url(master, secret_file) -> None:
    """Print the web console's login URL (it carries the console token: keep it private)."""
    host = master_address(master)[0]  # how we reach the master: its console is there too
    click.echo(call_master(master, secret_file, "console_url", host=host))
