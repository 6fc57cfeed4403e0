"""`cachefs load` and `cachefs job ls|cancel`.

Exit status of a load that is followed to its end: 0 when every file was loaded and stayed
cached on its owner; 1 when files failed or the job failed; EXIT_NOT_KEPT (3) when every file
was fetched but not all stayed cached (the cache is too small for them, or other data evicted
them): a warning a script can tell from a failure.
"""

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

EXIT_NOT_KEPT = 3
ADVICE = "raise --mem/--disk or add workers"


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


def _percent(part: int, whole: int) -> str:
    """A share to one decimal that reads 100.0% only when it is all."""
    if not whole:
        return "100.0%"
    share = 100 * part / whole
    return f"{min(share, 99.9) if part < whole else share:.1f}%"


def held_text(held: dict, verb: str = "cached", failed: int = 0) -> str:
    """`n/N files <verb> (p%), X of Y (p%)` from a holdings check (`load --check`, and the
    `kept` of a finished load), and why not all, when the cache is the reason."""
    text = (
        f"{held['cached_files']}/{held['files']} files {verb} "
        f"({_percent(held['cached_files'], held['files'])}), "
        f"{human_bytes(held['cached_bytes'])} of {human_bytes(held['bytes'])} "
        f"({_percent(held['cached_bytes'], held['bytes'])})"
    )
    why = shortfall(held, failed)
    return f"{text}: {why}" if why else text


def shortfall(held: dict, failed: int = 0) -> str | None:
    """Why the cache holds fewer than all the files, in one clause; None if it holds them all
    or if nothing says the cache is to blame (e.g. a check before any load)."""
    if held["cached_files"] >= held["files"] or "capacity_bytes" not in held:
        return None
    n = held["workers"]
    cache = f"{human_bytes(held['capacity_bytes'])} over {n} worker{'' if n == 1 else 's'}"
    subject, verb = ("the dataset", "is") if held["whole"] else ("the files asked for", "are")
    if held["replicas"] > 1:
        subject += f" ({held['replicas']} copies, {human_bytes(held['need_bytes'])})"
    quota = held.get("quota_bytes")
    if quota is not None and held["need_bytes"] > quota:
        whose = "its" if held["whole"] else "the dataset's"
        return (
            f"{subject} {verb} larger than {whose} quota ({human_bytes(quota)}); raise or "
            "clear it: cachefs dataset set NAME --quota SIZE|none"
        )
    if held["need_bytes"] > held["capacity_bytes"]:
        return f"{subject} {verb} larger than the cache ({cache}); {ADVICE}"
    over = held.get("over")
    if over:
        return (
            f"worker {over['worker']}'s share (host {over['host']}, "
            f"{human_bytes(over['bytes'])}) is larger than its cache "
            f"({human_bytes(over['capacity'])}); {ADVICE}"
        )
    if held.get("used_bytes") is not None and not failed:  # after a load that fetched all
        return (
            f"the rest was evicted (the cache: {cache}, "
            f"{human_bytes(held['used_bytes'])} of it in use); {ADVICE}"
        )
    return None


def job_line(job: dict) -> str:
    p = job["progress"]
    line = (
        f"job {job['id']} {job['state']}: {p['done_files']}/{p['files']} files "
        f"({human_bytes(p['done_bytes'])} of {human_bytes(p['bytes'])}), "
        f"{p['cached_files']} already cached, {p['failed_files']} failed"
    )
    if job.get("kept"):
        line += "; " + held_text(job["kept"], "stayed cached", p["failed_files"])
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
@click.option("--check", is_flag=True,
              help="only report what is cached of the paths, and if they fit in the cache")
@master_option
@secret_option
@errors_to_exit
def load(name, paths, files_list, metadata_only, replicas, every, cron, no_wait, check, master,
         secret_file):  # fmt: skip
    """Preload files of dataset NAME (all, or under PATHS) into the cache.

    Ends with what stayed cached; exit status 3 if every file was fetched but not all stayed
    (e.g. the dataset is larger than the cache), 1 if files failed.
    """
    files = [line.strip() for line in files_list if line.strip()] if files_list else None
    if check:
        held = call_master(master, secret_file, "load_check", dataset=name, paths=list(paths),
                           files=files, replicas=replicas)  # fmt: skip
        click.echo(f"{name}: {held_text(held)}")
        return
    job = call_master(
        master, secret_file, "load_start", dataset=name, paths=list(paths), files=files,
        replicas=replicas, metadata_only=metadata_only, every=parse_duration(every), cron=cron,
    )  # fmt: skip
    _report(job, no_wait, master, secret_file)


def _report(job: dict, no_wait: bool, master, secret_file) -> None:
    """Prints a submitted job's id, or follows it to its end: exit status 1 if files failed,
    EXIT_NOT_KEPT if all were fetched but not all stayed cached."""
    if no_wait or job["schedule"]:
        click.echo(f"job {job['id']} submitted" + (" (periodic)" if job["schedule"] else ""))
        return
    job = trio.run(_follow_job, master_client(master, secret_file), job["id"])
    click.echo(job_line(job))
    if job["state"] != "done" or job["progress"]["failed_files"]:
        for path, message in job["failures"][:10]:
            click.echo(f"  failed: {path}: {message}", err=True)
        sys.exit(1)
    kept = job.get("kept")
    if kept and kept["cached_files"] < kept["files"]:
        sys.exit(EXIT_NOT_KEPT)


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
