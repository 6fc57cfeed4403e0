"""`cachefs mount` (embedded or cluster) and `cachefs umount`."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
import trio

from cachefs.cli.app import main
from cachefs.cli.common import (
    current_tls,
    errors_to_exit,
    master_option,
    metrics_option,
    parse_options,
    secret_option,
    shm_options,
)
from cachefs.config import master_address, parse_size
from cachefs.credentials import client_secret, server_secret


@main.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@master_option
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground")
@click.option("--state", type=click.Path(file_okay=False), help="embedded mode state directory")
@click.option("--mem", default="512M", show_default=True, help="embedded worker RAM tier")
@click.option("--disk", type=click.Path(file_okay=False), help="embedded worker DISK tier dir")
@click.option("--disk-size", default="0", help="embedded worker DISK tier size")
@click.option("--keep-cache", is_flag=True,
              help="embedded: keep the tiers after umount for the next mount (default: the "
                   "RAM tier and the DISK tier file are removed)")  # fmt: skip
@shm_options
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="URI option")
@click.option("--attr-timeout", default=3600.0, show_default=True, help="kernel attr/entry cache s")
@click.option("--op-timeout", default=60.0, show_default=True, help="deadline of each FUSE op, s")
@click.option("--read-ahead-kb", default=1024, show_default=True, type=click.IntRange(min=0),
              help="kernel readahead of the mount, KiB (0: the kernel's default)")  # fmt: skip
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="serving processes of the mount [default: cores / 2, 1 to 4]")  # fmt: skip
@click.option("--allow-other", is_flag=True, help="let other users read the mount")
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="files warmed after a cold read in a directory, 0: off [default: "
                   "fuse/prefetch.py WINDOW, 32]")  # fmt: skip
@click.option("--resync", is_flag=True,
              help="embedded: list the store again before serving (else a dataset synced "
                   "before is served from its snapshot)")  # fmt: skip
@secret_option
@metrics_option
@errors_to_exit
def mount(
    source,
    mountpoint,
    master,
    foreground,
    state,
    mem,
    disk,
    disk_size,
    options,
    attr_timeout,
    op_timeout,
    read_ahead_kb,
    procs,
    allow_other,
    prefetch,
    resync,
    keep_cache,
    shm,
    shm_share,
    secret_file,
    metrics,
):
    """Mount SOURCE read-only on MOUNTPOINT.

    SOURCE is a URI (embedded mode: master, worker and client in this process) or, with
    --master, a dataset name. Returns once the mount answers, unless --foreground.
    """
    from cachefs.fuse import mount as mounting
    from cachefs.fuse.serving import default_procs

    mountpoint_path = Path(mountpoint).resolve()
    mounting.check_mountpoint(mountpoint_path)
    uri_options = parse_options(options)
    embedded = master is None and "://" in source
    if embedded:
        from cachefs.ufs import parse_uri

        parse_uri(source, uri_options)
    state_base = Path(state or Path.home() / ".cache" / "cachefs").expanduser().resolve()
    if not foreground:
        argv = sys.argv[1:]
        log_path = mounting.pid_file(mountpoint_path).with_suffix(".log")
        record = mounting.spawn_background(argv, mountpoint_path, log_path)
        click.echo(f"cachefs: {source} mounted on {mountpoint_path} (log: {log_path})")
        if record.get("master"):  # embedded mode: where `cachefs load/status` reach it
            where = record["master"]
            click.echo(f"cachefs: its master: {where} (secret: {record['secret_file']}), "
                       f"e.g. cachefs status --master {where}")  # fmt: skip
        return
    secret_path = None
    if embedded:
        from cachefs.runtime import private_dir

        state_dir = private_dir(mounting.embedded_state_dir(state_base, source))
        secret, secret_path = server_secret(secret_file, state_dir)  # the embedded master's
    else:
        secret = client_secret(secret_file, master_address(master))
    tuned = {} if prefetch is None else {"prefetch": prefetch}
    opts = mounting.MountOptions(
        entry_timeout=attr_timeout, attr_timeout=attr_timeout, op_timeout=op_timeout,
        read_ahead_kb=read_ahead_kb, allow_other=allow_other, secret=secret,
        procs=procs or default_procs(),
        secret_file=str(secret_path.resolve()) if secret_path else None,
        tls=None if embedded else current_tls(), **tuned,
    )  # fmt: skip
    if embedded:
        from cachefs.worker.store import BlockStore

        def store_factory(path):
            return BlockStore(
                path,
                mem_capacity=parse_size(mem),
                disk_dir=Path(disk) if disk else None,
                disk_capacity=parse_size(disk_size),
                shm_dir=Path(shm),
                shm_share=shm_share,
            )

        serve = functools.partial(
            mounting.run_embedded, source, uri_options, mountpoint_path, state_dir,
            store_factory, opts, resync=resync, keep_cache=keep_cache,
        )  # fmt: skip
    else:
        serve = functools.partial(
            mounting.run_cluster_mount, source, master_address(master), mountpoint_path, opts
        )
    from cachefs import metrics as prometheus

    prometheus.serve(metrics)
    trio.run(mounting.run_foreground, serve, mountpoint_path)


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@errors_to_exit
def umount(mountpoint):
    """Unmount a cachefs mount and wait for its process to exit."""
    from cachefs.fuse.mount import unmount

    unmount(Path(mountpoint).resolve())
