"""`cachefs load` and `cachefs job ls|cancel`."""

from __future__ import annotations

import sys

import click
import trio

from cachefs.cli.app import main
from cachefs.cli.common import (
    call_master,
    errors_to_exit,
    human_bytes,
    master_client,
    master_option,
    secret_option,
)
from cachefs.errors import InvalidArgument
from cachefs.rpc import RpcClient


def parse_duration(text: str | None) -> float | None:
    """'30s', '5m', '2h', '1d' or plain seconds -> seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:].lower() in units:
            return float(text[:-1]) * units[text[-1].lower()]
        return float(text)
    except ValueError:
        raise InvalidArgument(f"invalid duration {text!r} (examples: 90s, 15m, 2h, 1d)") from None


def job_line(job: dict) -> str:
    p = job["progress"]
    line = (
        f"job {job['id']} {job['state']}: {p['done_files']}/{p['files']} files "
        f"({human_bytes(p['done_bytes'])} of {human_bytes(p['bytes'])}), "
        f"{p['cached_files']} already cached, {p['failed_files']} failed"
    )
    if job.get("error"):
        line += f"; error: {job['error']}"
    return line


@main.command()
@click.argument("name")
@click.argument("paths", nargs=-1)
@click.option("--files", "files_list", type=click.File(), help="file with one path per line")
@click.option("--metadata-only", is_flag=True, help="only sync the metadata")
@click.option("--replicas", default=1, show_default=True, help="copies on distinct workers")
@click.option("--every", metavar="DURATION", help="repeat: sync, then load what changed")
@click.option("--cron", metavar="EXPR", help='repeat on a cron schedule, e.g. "0 3 * * *"')
@click.option("--no-wait", is_flag=True, help="print the job id and return")
@click.option("--check", is_flag=True, help="only report the cached share of the paths")
@master_option
@secret_option
@errors_to_exit
def load(name, paths, files_list, metadata_only, replicas, every, cron, no_wait, check, master,
         secret_file):  # fmt: skip
    """Preload files of dataset NAME (all, or under PATHS) into the cache."""
    files = [line.strip() for line in files_list if line.strip()] if files_list else None
    if check:
        r = call_master(master, secret_file, "load_check", dataset=name, paths=list(paths),
                         files=files)  # fmt: skip
        pct_files = 100 * r["cached_files"] / r["files"] if r["files"] else 100.0
        pct_bytes = 100 * r["cached_bytes"] / r["bytes"] if r["bytes"] else 100.0
        click.echo(
            f"{name}: {r['cached_files']}/{r['files']} files cached ({pct_files:.1f}%), "
            f"{human_bytes(r['cached_bytes'])} of {human_bytes(r['bytes'])} ({pct_bytes:.1f}%)"
        )
        return
    job = call_master(
        master, secret_file, "load_start", dataset=name, paths=list(paths), files=files,
        replicas=replicas, metadata_only=metadata_only, every=parse_duration(every), cron=cron,
    )  # fmt: skip
    _report(job, no_wait, master, secret_file)


def _report(job: dict, no_wait: bool, master, secret_file) -> None:
    """Prints a submitted job's id, or follows it to its end (exit status 1 if files failed)."""
    if no_wait or job["schedule"]:
        click.echo(f"job {job['id']} submitted" + (" (periodic)" if job["schedule"] else ""))
        return
    job = trio.run(_follow_job, master_client(master, secret_file), job["id"])
    click.echo(job_line(job))
    if job["state"] != "done" or job["progress"]["failed_files"]:
        for path, message in job["failures"][:10]:
            click.echo(f"  failed: {path}: {message}", err=True)
        sys.exit(1)


@main.command()
@click.argument("name")
@click.option("--order", "order_list", type=click.File(), required=True,
              help="the readers' order: one path per line (e.g. the epoch's sampler order)")
@click.option("--window", default=256, show_default=True, type=click.IntRange(min=1),
              help="files fetched at once, in that order")
@click.option("--no-wait", is_flag=True, help="print the job id and return")
@master_option
@secret_option
@errors_to_exit
def prefetch(name, order_list, window, no_wait, master, secret_file):
    """Fetch files of dataset NAME into the cache in the order the readers will read them."""
    files = [line.strip() for line in order_list if line.strip()]
    job = call_master(master, secret_file, "load_start", dataset=name, files=files,
                      window=window)  # fmt: skip
    _report(job, no_wait, master, secret_file)


async def _follow_job(client: RpcClient, job_id: int) -> dict:
    """Polls a job until it ends, with a progress bar on a terminal."""
    from tqdm import tqdm

    async with client:
        bar = None
        while True:
            job = await client.call("job", job_id=job_id)
            p = job["progress"]
            if sys.stderr.isatty() and p["bytes"]:
                if bar is None:
                    bar = tqdm(total=p["bytes"], unit="B", unit_scale=True, desc=f"job {job_id}")
                bar.update(p["done_bytes"] + p["failed_bytes"] - bar.n)
            if job["state"] not in ("pending", "running"):
                if bar is not None:
                    bar.close()
                return job
            await trio.sleep(0.25)


@main.group()
def job() -> None:
    """List and cancel load jobs."""


@job.command("ls")
@master_option
@secret_option
@errors_to_exit
def job_ls(master, secret_file) -> None:
    """List load jobs with their progress."""
    for item in call_master(master, secret_file, "jobs"):
        schedule = item["schedule"] or {}
        when = f" every {schedule['every']:g}s" if "every" in schedule else ""
        when = f" cron '{schedule['cron']}'" if "cron" in schedule else when
        click.echo(f"{job_line(item)} [{item['dataset']}{when}, runs {item['runs']}]")


@job.command("cancel")
@click.argument("job_id", type=int)
@master_option
@secret_option
@errors_to_exit
def job_cancel(job_id, master, secret_file) -> None:
    """Cancel a load job (a periodic one stops recurring)."""
    click.echo(job_line(call_master(master, secret_file, "job_cancel", job_id=job_id)))
