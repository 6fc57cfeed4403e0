"""`cachefs gc`: gives back the RAM of tiers no running cachefs process owns."""

from __future__ import annotations

from pathlib import Path

import click

from cachefs.cli.app import main
from cachefs.cli.common import errors_to_exit, human_bytes


@main.command()
@click.option("--shm", default="/dev/shm", show_default=True, type=click.Path(file_okay=False),
              help="where the RAM tiers are (a worker's --shm)")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
@errors_to_exit
def gc(shm, dry_run):
    """Remove the RAM tiers in SHM that no running cachefs process owns.

    A tier is owned while its worker or embedded mount runs (it holds a lock on the tier's
    `owner` file; the kernel drops it when the process dies, even if killed). A tier nobody
    owns and no process maps is left by a killed mount, a failed start of an older version, or
    a stopped worker (kept for its restart: a worker started after gc starts with a cold RAM
    tier). Live tiers are never touched.
    """
    from cachefs.worker.ramtier import collect

    removed, kept = collect(Path(shm), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for found in removed:
        click.echo(f"{verb} {found.path} ({human_bytes(found.bytes)}): {found.reason}")
    for found in kept:
        click.echo(f"kept {found.path} ({human_bytes(found.bytes)}): {found.reason}")
    total = human_bytes(sum(found.bytes for found in removed))
    click.echo(f"{verb} {len(removed)} orphaned RAM tier(s) ({total}), kept {len(kept)}")
