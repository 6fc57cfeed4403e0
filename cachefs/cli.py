"""The `cachefs` command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage error (click's own, or InvalidArgument). Every
failure is one line on stderr: `cachefs: error: ...`.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path

import click
import trio

from cachefs.config import (
    CONFIG_PATHS,
    MASTER_ENV,
    format_address,
    load_config,
    master_address,
    parse_address,
    parse_size,
)
from cachefs.credentials import SECRET_ENV, client_secret, load_or_create, read_secret
from cachefs.errors import CacheFsError, InvalidArgument
from cachefs.rpc import RpcClient
from cachefs.tls import TlsConfig

#: A sync of millions of remote entries takes minutes; the CLI waits for it.
LONG_CALL_TIMEOUT = 6 * 3600.0


def _fail(message: str, code: int) -> None:
    click.echo(f"cachefs: error: {message}", err=True)
    sys.exit(code)


def _errors_to_exit(func):
    """CacheFsError -> one line and exit 1 (2 for bad input); Ctrl-C -> exit 130 quietly."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (CacheFsError, BaseExceptionGroup) as exc:
            error = _cachefs_error(exc)
            if error is None:
                raise
            _fail(error.message, 2 if isinstance(error, InvalidArgument) else 1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def _cachefs_error(exc: BaseException) -> CacheFsError | None:
    """The CacheFsError behind an exception, looking inside trio's exception groups."""
    if isinstance(exc, CacheFsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _cachefs_error(inner)
            if found is not None:
                return found
    return None


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"option {pair!r} is not KEY=VALUE")
        options[key] = value
    return options


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _call_master(master: str | None, secret_file: str | None, method: str, **args):
    address = master_address(master)
    secret = client_secret(secret_file, address)
    tls = _tls()

    async def run():
        async with RpcClient(
            address, secret=secret, timeout=LONG_CALL_TIMEOUT, tls=tls, name="master"
        ) as client:
            return await client.call(method, **args)

    return trio.run(run)


master_option = click.option(
    "--master",
    envvar=MASTER_ENV,
    metavar="HOST:PORT",
    help="master address (default $CACHEFS_MASTER or 127.0.0.1:19470)",
)
metrics_option = click.option(
    "--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on this address"
)
_secret_file_option = click.option(
    "--secret-file",
    envvar=SECRET_ENV,
    type=click.Path(dir_okay=False),
    help="the cluster's shared secret (default $CACHEFS_SECRET_FILE, else the one a master on "
    "this host published for this user)",
)
_TLS_FLAGS = {
    "tls_cert": "this node's TLS certificate (PEM; with --tls-ca: mutual TLS)",
    "tls_key": "its private key (PEM, unencrypted; default: in the certificate file)",
    "tls_ca": "the cluster CA that signs every node's certificate",
}


def _remember_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta.setdefault("cachefs.tls", {})[param.name] = value


def secret_option(command):
    """--secret-file and the --tls-* flags: how a command proves itself to the cluster."""
    for name, text in reversed(_TLS_FLAGS.items()):
        command = click.option(
            "--" + name.replace("_", "-"), name, type=click.Path(dir_okay=False),
            envvar="CACHEFS_" + name.upper(), expose_value=False, callback=_remember_tls,
            help=text,
        )(command)  # fmt: skip
    return _secret_file_option(command)


def _tls() -> TlsConfig | None:
    """The TLS settings of the running command (None: plain TCP)."""
    files = click.get_current_context().meta.get("cachefs.tls", {})
    return TlsConfig.from_files(files.get("tls_cert"), files.get("tls_key"), files.get("tls_ca"))


async def _serve_until_signal(service, kind: str) -> None:
    """Runs a server task until SIGINT or SIGTERM, announcing its address once it listens."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(service)
            # Tests and scripts wait for this line (it carries the port when --listen used :0).
            print(f"cachefs {kind} listening on {format_address(bound)}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CACHEFS"}
)
@click.option("--log-level", default="WARNING", show_default=True, help="DEBUG, INFO, WARNING...")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help=f"TOML file of option defaults (default: the first of {', '.join(CONFIG_PATHS)})",
)
@click.version_option(package_name="cachefs")
@click.pass_context
def main(ctx: click.Context, log_level: str, config_path: str | None) -> None:
    """cachefs: a distributed read cache for deep-learning training data.

    Every option can come from the config file ([COMMAND] tables, option names with
    underscores) or from CACHEFS_<COMMAND>_<OPTION> environment variables; the command line
    wins over the environment, which wins over the file.
    """
    try:
        ctx.default_map = load_config(config_path)
    except InvalidArgument as exc:
        _fail(exc.message, 2)
    if ctx.get_parameter_source("log_level") == click.core.ParameterSource.DEFAULT:
        log_level = ctx.default_map.get("log_level", log_level)  # the file's top-level key
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


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
@_errors_to_exit
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
            "every dataset and change the cluster", listen
        )
    elif secret_file:
        secret = read_secret(secret_file)
    else:
        from cachefs.runtime import private_dir

        secret = load_or_create(private_dir(Path(state)) / "secret")
    address = parse_address(listen)
    service = functools.partial(
        run_master, address, state, secret=secret, publish_secret=True, tls=_tls(),
        liveness=liveness,
        http=parse_address(http) if http else None,
    )  # fmt: skip
    trio.run(_serve_until_signal, service, "master")


@master.command("backup")
@click.argument("name", default="")
@master_option
@secret_option
@_errors_to_exit
def master_backup(name, master, secret_file) -> None:
    """Write a consistent copy of a running master's state to STATE/backups/NAME.

    The master writes only inside its own state dir (default NAME: meta-<date>.lmdb); copy the
    file from there.
    """
    name = name or datetime.now().strftime("meta-%Y%m%d-%H%M%S.lmdb")
    result = _call_master(master, secret_file, "backup", path=name)
    click.echo(f"backup of {result['datasets']} datasets written to {result['path']} "
               f"({_human_bytes(result['bytes'])})")  # fmt: skip


@main.command()
@master_option
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT")
@click.option("--advertise", metavar="HOST:PORT", help="address clients use (default: --listen)")
@click.option("--state", required=True, type=click.Path(file_okay=False), help="index and id")
@click.option("--mem", default="1G", show_default=True, help="RAM tier size (0 for none)")
@click.option("--disk", type=click.Path(file_okay=False), help="directory for the DISK tier")
@click.option("--disk-size", default="0", help="DISK tier size, e.g. 100G")
@click.option("--host-id", help="node name for locality (default: hostname)")
@click.option("--shm", default="/dev/shm", show_default=True, type=click.Path(file_okay=False))
@secret_option
@metrics_option
@_errors_to_exit
def worker(
    master, listen, advertise, state, mem, disk, disk_size, host_id, shm, secret_file, metrics
):
    """Run a cache worker (foreground)."""
    from cachefs import metrics as prometheus

    prometheus.serve(metrics)
    from cachefs.worker.service import run_worker
    from cachefs.worker.store import BlockStore

    if disk and not parse_size(disk_size):
        raise InvalidArgument("--disk needs --disk-size")
    secret = client_secret(secret_file, master_address(master))
    store = BlockStore(
        Path(state),
        mem_capacity=parse_size(mem),
        disk_dir=Path(disk) if disk else None,
        disk_capacity=parse_size(disk_size),
        shm_dir=Path(shm),
    )
    service = functools.partial(
        run_worker,
        master_address(master),
        parse_address(listen),
        store,
        advertise=advertise,
        host_id=host_id,
        secret=secret,
        tls=_tls(),
    )
    try:
        trio.run(_serve_until_signal, service, "worker")
    finally:
        store.close()


@main.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@master_option
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground")
@click.option("--state", type=click.Path(file_okay=False), help="embedded mode state directory")
@click.option("--mem", default="512M", show_default=True, help="embedded worker RAM tier")
@click.option("--disk", type=click.Path(file_okay=False), help="embedded worker DISK tier dir")
@click.option("--disk-size", default="0", help="embedded worker DISK tier size")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="URI option")
@click.option("--attr-timeout", default=3600.0, show_default=True, help="kernel attr/entry cache s")
@click.option("--op-timeout", default=60.0, show_default=True, help="deadline of each FUSE op, s")
@click.option("--allow-other", is_flag=True, help="let other users read the mount")
@secret_option
@metrics_option
@_errors_to_exit
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
    allow_other,
    secret_file,
    metrics,
):
    """Mount SOURCE read-only on MOUNTPOINT.

    SOURCE is a URI (embedded mode: master, worker and client in this process) or, with
    --master, a dataset name. Returns once the mount answers, unless --foreground.
    """
    from cachefs.fuse import mount as mounting

    mountpoint_path = Path(mountpoint).resolve()
    mounting.check_mountpoint(mountpoint_path)
    uri_options = _parse_options(options)
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
    if embedded:
        from cachefs.runtime import private_dir

        state_dir = private_dir(mounting.embedded_state_dir(state_base, source))
        secret_path = Path(secret_file) if secret_file else state_dir / "secret"
        secret = read_secret(secret_path) if secret_file else load_or_create(secret_path)
    else:
        secret = client_secret(secret_file, master_address(master))
    opts = mounting.MountOptions(
        entry_timeout=attr_timeout, attr_timeout=attr_timeout, op_timeout=op_timeout,
        allow_other=allow_other, secret=secret, tls=None if embedded else _tls(),
    )  # fmt: skip
    if embedded:
        opts.secret_file = str(secret_path.resolve())
        from cachefs.worker.store import BlockStore

        def store_factory(path):
            return BlockStore(
                path,
                mem_capacity=parse_size(mem),
                disk_dir=Path(disk) if disk else None,
                disk_capacity=parse_size(disk_size),
            )

        serve = functools.partial(
            mounting.run_embedded, source, uri_options, mountpoint_path, state_dir,
            store_factory, opts,
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
@_errors_to_exit
def umount(mountpoint):
    """Unmount a cachefs mount and wait for its process to exit."""
    from cachefs.fuse.mount import unmount

    unmount(Path(mountpoint).resolve())


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
@_errors_to_exit
def dataset_add(name, uri, options, no_sync, master, secret_file) -> None:
    """Register NAME for URI (file://, s3://, hdfs://, webhdfs://) and sync its metadata."""
    opts = _parse_options(options)
    _call_master(master, secret_file, "dataset_add", name=name, uri=uri, options=opts)
    if no_sync:
        click.echo(f"dataset {name} added")
        return
    report = _call_master(master, secret_file, "dataset_sync", name=name)
    click.echo(f"dataset {name} added: {_sync_line(report)}")


def _sync_line(report: dict) -> str:
    return (
        f"{report['files']} files, {_human_bytes(report['bytes'])}; "
        f"added {report['added']}, changed {report['changed']}, removed {report['removed']} "
        f"in {report['seconds']:.2f}s"
    )


@dataset.command("sync")
@click.argument("name")
@master_option
@secret_option
@_errors_to_exit
def dataset_sync(name, master, secret_file) -> None:
    """Re-list the remote tree: new files appear, changed ones get a new version."""
    report = _call_master(master, secret_file, "dataset_sync", name=name)
    click.echo(f"dataset {name} synced: {_sync_line(report)}")


@dataset.command("ls")
@master_option
@secret_option
@_errors_to_exit
def dataset_ls(master, secret_file) -> None:
    """List datasets."""
    for info in _call_master(master, secret_file, "dataset_list"):
        click.echo(
            f"{info['name']}\t{info['uri']}\t{info['files']} files\t{_human_bytes(info['bytes'])}"
        )


@dataset.command("clean")
@click.argument("name")
@master_option
@secret_option
@_errors_to_exit
def dataset_clean(name, master, secret_file) -> None:
    """Drop the dataset's cached data on every worker (metadata stays)."""
    result = _call_master(master, secret_file, "dataset_clean", name=name)
    click.echo(f"dataset {name}: {result['evicted']} cache entries dropped on "
               f"{result['workers']} workers")  # fmt: skip


@dataset.command("rm")
@click.argument("name")
@master_option
@secret_option
@_errors_to_exit
def dataset_rm(name, master, secret_file) -> None:
    """Remove a dataset's metadata (the remote store is never touched)."""
    _call_master(master, secret_file, "dataset_remove", name=name)
    click.echo(f"dataset {name} removed")


def _parse_duration(text: str | None) -> float | None:
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


def _job_line(job: dict) -> str:
    p = job["progress"]
    line = (
        f"job {job['id']} {job['state']}: {p['done_files']}/{p['files']} files "
        f"({_human_bytes(p['done_bytes'])} of {_human_bytes(p['bytes'])}), "
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
@_errors_to_exit
def load(name, paths, files_list, metadata_only, replicas, every, cron, no_wait, check, master,
         secret_file):  # fmt: skip
    """Preload files of dataset NAME (all, or under PATHS) into the cache."""
    files = [line.strip() for line in files_list if line.strip()] if files_list else None
    if check:
        r = _call_master(master, secret_file, "load_check", dataset=name, paths=list(paths),
                         files=files)  # fmt: skip
        pct_files = 100 * r["cached_files"] / r["files"] if r["files"] else 100.0
        pct_bytes = 100 * r["cached_bytes"] / r["bytes"] if r["bytes"] else 100.0
        click.echo(
            f"{name}: {r['cached_files']}/{r['files']} files cached ({pct_files:.1f}%), "
            f"{_human_bytes(r['cached_bytes'])} of {_human_bytes(r['bytes'])} ({pct_bytes:.1f}%)"
        )
        return
    job = _call_master(
        master, secret_file, "load_start", dataset=name, paths=list(paths), files=files,
        replicas=replicas, metadata_only=metadata_only, every=_parse_duration(every), cron=cron,
    )  # fmt: skip
    if no_wait or job["schedule"]:
        click.echo(f"job {job['id']} submitted" + (" (periodic)" if job["schedule"] else ""))
        return
    job = trio.run(_follow_job, master, secret_file, job["id"], _tls())
    click.echo(_job_line(job))
    if job["state"] != "done" or job["progress"]["failed_files"]:
        for path, message in job["failures"][:10]:
            click.echo(f"  failed: {path}: {message}", err=True)
        sys.exit(1)


async def _follow_job(master, secret_file, job_id, tls) -> dict:
    """Polls a job until it ends, with a progress bar on a terminal."""
    from tqdm import tqdm

    address = master_address(master)
    secret = client_secret(secret_file, address)
    async with RpcClient(address, secret=secret, tls=tls, name="master") as client:
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
@_errors_to_exit
def job_ls(master, secret_file) -> None:
    """List load jobs with their progress."""
    for item in _call_master(master, secret_file, "jobs"):
        schedule = item["schedule"] or {}
        when = f" every {schedule['every']:g}s" if "every" in schedule else ""
        when = f" cron '{schedule['cron']}'" if "cron" in schedule else when
        click.echo(f"{_job_line(item)} [{item['dataset']}{when}, runs {item['runs']}]")


@job.command("cancel")
@click.argument("job_id", type=int)
@master_option
@secret_option
@_errors_to_exit
def job_cancel(job_id, master, secret_file) -> None:
    """Cancel a load job (a periodic one stops recurring)."""
    click.echo(_job_line(_call_master(master, secret_file, "job_cancel", job_id=job_id)))


@main.command()
@click.argument("name")
@click.option("--k8s", is_flag=True, help="print a preferred nodeAffinity block")
@master_option
@secret_option
@_errors_to_exit
def affinity(name, k8s, master, secret_file) -> None:
    """Worker hosts ranked by their cached share of dataset NAME."""
    ranked = _call_master(master, secret_file, "affinity", dataset=name)
    if not k8s:
        for row in ranked:
            click.echo(
                f"{row['host']:<24} {_human_bytes(row['cached_bytes']):>12} "
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


@main.command("console-url")
@master_option
@secret_option
@_errors_to_exit
def console_url(master, secret_file) -> None:
    """Print the web console's login URL (it carries the console token: keep it private)."""
    host = master_address(master)[0]  # how we reach the master: its console is there too
    click.echo(_call_master(master, secret_file, "console_url", host=host))


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@master_option
@secret_option
@_errors_to_exit
def status(name, as_json, master, secret_file) -> None:
    """Datasets (files, bytes, last sync) and live workers."""
    report = _call_master(master, secret_file, "status")
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
            f"  {info['name']:<16} {info['files']:>9} files {_human_bytes(info['bytes']):>10}"
            f"  {info['cached_percent']:.1f}% cached"
            f"  hit ratio {'-' if hit is None else f'{100 * hit:.1f}%'}"
            f"  synced {when}  {info['uri']}"
        )
    click.echo(f"workers ({len(report['workers'])}, epoch {report['epoch']}):")
    for worker in report["workers"]:
        tiers = worker["stats"].get("tiers", {})
        usage = ", ".join(
            f"{name} {_human_bytes(t['used'])}/{_human_bytes(t['capacity'])}"
            for name, t in tiers.items()
        )
        click.echo(f"  {worker['id']:<14} {worker['address']:<22} host {worker['host']}  {usage}")
    jobs = [j for j in report.get("jobs", []) if name is None or j["dataset"] == name]
    if jobs:
        click.echo(f"jobs ({len(jobs)}):")
        for item in jobs:
            click.echo(f"  {_job_line(item)}")


if __name__ == "__main__":
    main()
