"""Secrets: the cluster's shared secret, the console token, and credentials in dataset options.

- A master creates its secret (and its console token) in its state dir on first start, 0600.
- It publishes the secret in the runtime dir of the user running it (0700, see
  `cachefs.runtime`), under its port: a client run by the same user on the same host finds it
  with no flag; anyone else needs `--secret-file` / `$CACHEFS_SECRET_FILE`.
- Dataset options whose key names a credential are shown as `***` everywhere but in the
  master's state and in the one authenticated call that hands them to workers and mounts.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from cachefs.errors import CacheFsError, InvalidArgument
from cachefs.runtime import private_dir, runtime_dir, write_private

SECRET_ENV = "CACHEFS_SECRET_FILE"
MIN_SECRET_BYTES = 16
REDACTED = "***"
#: Option keys holding credentials (matched anywhere in the key, any case).
_SENSITIVE = re.compile(r"secret|token|password|passwd|credential|access_key", re.I)


def read_secret(path: str | os.PathLike, *, follow: bool = True) -> bytes:
    """The secret in a 0600 file (at least 16 bytes, surrounding whitespace dropped).

    One open, checked and read through the same descriptor. `follow=False` refuses a symlink:
    for the files cachefs publishes itself (a given --secret-file may well be a link, e.g. in a
    Kubernetes Secret volume).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        with os.fdopen(os.open(path, flags), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read secret file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise InvalidArgument(f"secret file {path} is readable by others; chmod 600 it")
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidArgument(f"secret file {path} holds fewer than {MIN_SECRET_BYTES} bytes")
    return secret


def load_or_create(path: Path) -> bytes:
    """The secret in `path`, made (random, 0600) if the file does not exist yet."""
    if not os.path.lexists(path):
        write_private(path, secrets.token_urlsafe(32).encode() + b"\n")
    return read_secret(path)


def server_secret(secret_file: str | None, state_dir: Path) -> tuple[bytes, Path]:
    """A master's secret and its file: the one given, else STATE/secret (made on first start)."""
    if secret_file:
        return read_secret(secret_file), Path(secret_file)
    path = private_dir(state_dir) / "secret"
    return load_or_create(path), path


def _published(port: int) -> Path:
    return runtime_dir() / f"master-{port}.secret"


def publish(port: int, secret: bytes) -> Path:
    """Let this user's clients on this host find the secret of the master on `port`."""
    path = _published(port)
    write_private(path, secret + b"\n")
    return path


def unpublish(port: int, secret: bytes) -> None:
    """Remove the published secret, unless another master took the port and rewrote it."""
    path = _published(port)
    try:
        if read_secret(path, follow=False) == secret:
            path.unlink()
    except (OSError, InvalidArgument):
        pass


def client_secret(secret_file: str | None, master: tuple[str, int] | None) -> bytes | None:
    """What a client authenticates with: --secret-file, then $CACHEFS_SECRET_FILE, then the
    secret a master on this host published for `master`'s port; None if there is none."""
    explicit = secret_file or os.environ.get(SECRET_ENV)
    if explicit:
        return read_secret(explicit)
    if master is None:
        return None
    try:
        return read_secret(_published(master[1]), follow=False)  # never a planted symlink
    except (OSError, CacheFsError):
        return None


def is_sensitive(key: str) -> bool:
    return bool(_SENSITIVE.search(key))


def redact(options: dict[str, str]) -> dict[str, str]:
    """`options` with every credential's value replaced by `***`."""
    return {k: REDACTED if is_sensitive(k) else v for k, v in options.items()}
