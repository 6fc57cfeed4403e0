"""What every command shares: one-line errors and exit codes, the options that reach the
cluster (--master, --secret-file, --tls-*), and calling the master."""

from __future__ import annotations

import functools
import signal
import sys

import click
import trio

from cachefs.config import MASTER_ENV, format_address, master_address
from cachefs.credentials import SECRET_ENV, client_secret
from cachefs.errors import CacheFsError, InvalidArgument
from cachefs.rpc import RpcClient
from cachefs.tls import TlsConfig

#: A sync of millions of remote entries takes minutes; the CLI waits for it.
LONG_CALL_TIMEOUT = 6 * 3600.0


def fail(message: str, code: int) -> None:
    click.echo(f"cachefs: error: {message}", err=True)
    sys.exit(code)


def errors_to_exit(func):
    """CacheFsError -> one line and exit 1 (2 for bad input); Ctrl-C -> exit 130 quietly."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (CacheFsError, BaseExceptionGroup) as exc:
            error = _cachefs_error(exc)
            if error is None:
                raise
            fail(error.message, 2 if isinstance(error, InvalidArgument) else 1)
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


def parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"option {pair!r} is not KEY=VALUE")
        options[key] = value
    return options


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def master_client(master: str | None, secret_file: str | None, **kwargs) -> RpcClient:
    """A client for the master with this command's credentials (use it `async with`)."""
    address = master_address(master)
    secret = client_secret(secret_file, address)
    return RpcClient(address, secret=secret, tls=current_tls(), name="master", **kwargs)


def call_master(master: str | None, secret_file: str | None, method: str, **args):
    client = master_client(master, secret_file, timeout=LONG_CALL_TIMEOUT)

    async def run():
        async with client:
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


def current_tls() -> TlsConfig | None:
    """The TLS settings of the running command (None: plain TCP)."""
    files = click.get_current_context().meta.get("cachefs.tls", {})
    return TlsConfig.from_files(files.get("tls_cert"), files.get("tls_key"), files.get("tls_ca"))


async def serve_until_signal(service, kind: str) -> None:
    """Runs a server task until SIGINT or SIGTERM, announcing its address once it listens."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(service)
            # Tests and scripts wait for this line (it carries the port when --listen used :0).
            print(f"cachefs {kind} listening on {format_address(bound)}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def shm_options(command):
    """--shm and --shm-share: where RAM tiers live and how much of it they may take."""
    from cachefs.worker.ramtier import DEFAULT_SHARE

    command = click.option(
        "--shm-share", type=click.FloatRange(0, 100, min_open=True), default=DEFAULT_SHARE,
        show_default=True,
        help="percent of the --shm filesystem all cachefs RAM tiers there may take together",
    )(command)  # fmt: skip
    return click.option(
        "--shm", default="/dev/shm", show_default=True, type=click.Path(file_okay=False),
        help="directory of the RAM tier (a tmpfs)",
    )(command)  # fmt: skip
