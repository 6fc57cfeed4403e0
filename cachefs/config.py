"""Small parsers and defaults shared by the CLI and the services (addresses, sizes, config)."""

from __future__ import annotations

import os
import re
import tomllib

from cachefs.errors import InvalidArgument

#: Where `cachefs dataset ...`, `cachefs status` and `cachefs mount NAME` look for the master
#: when no `--master` is given (the environment variable overrides it).
DEFAULT_MASTER = "127.0.0.1:19470"
MASTER_ENV = "CACHEFS_MASTER"

#: Config files looked for when no --config is given, first found wins.
CONFIG_PATHS = ("/etc/cachefs/cachefs.toml", "~/.config/cachefs/cachefs.toml")
CONFIG_ENV = "CACHEFS_CONFIG"


def load_config(path: str | None) -> dict:
    """Option defaults from a TOML file: {"worker": {"mem": "8G"}, "dataset": {"add": {...}}}.

    Keys are option names with underscores; tables are (sub)commands. No file: {}.
    """
    explicit = path or os.environ.get(CONFIG_ENV)
    if explicit and not os.path.exists(explicit):
        raise InvalidArgument(f"config file {explicit} does not exist")
    found = [explicit] if explicit else [
        p for p in map(os.path.expanduser, CONFIG_PATHS) if os.path.exists(p)
    ]  # fmt: skip
    if not found:
        return {}
    try:
        with open(found[0], "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"cannot read config file {found[0]}: {exc}") from None


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str | int) -> int:
    """'64M', '1GiB', '512k', '1000' -> bytes (single letters are binary, as in `free -h`)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise InvalidArgument(f"invalid size {text!r} (examples: 512M, 4GiB, 1000000)")
    return int(float(match.group(1)) * unit)


def parse_address(
    text: str | tuple[str, int], *, default_host: str = "127.0.0.1"
) -> tuple[str, int]:
    """'host:port', ':port', '[v6]:port' or (host, port) -> (host, port)."""
    if isinstance(text, tuple):
        return text[0], int(text[1])
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", text.strip())
    if not match:
        raise InvalidArgument(f"invalid address {text!r} (expected HOST:PORT)")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"invalid port in address {text!r}")
    return (match.group(1) or default_host, port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def master_address(explicit: str | None) -> tuple[str, int]:
    return parse_address(explicit or os.environ.get(MASTER_ENV) or DEFAULT_MASTER)
