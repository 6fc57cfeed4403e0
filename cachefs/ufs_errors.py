"""How a remote store's failures become cachefs errors: which kind, retried or not, and a
one-line message naming the remote path. Kept apart from cachefs.ufs, which uses it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from obstore.exceptions import BaseError as ObstoreError

from cachefs import errors

if TYPE_CHECKING:
    from cachefs.ufs_uri import DatasetUri

# pyarrow reports most remote failures as plain OSError, obstore most as GenericError, so the
# message decides the kind.
_DENIED = re.compile(
    r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY|SIGNATURE_DOES_NOT_MATCH|"
    r"HTTP status 40[13]|status code: 40[13]|Forbidden|Unauthorized"
)
_MISSING = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|NO_SUCH_KEY|HTTP status 404")
_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|Could not connect|Connection refused|Connection reset|Broken pipe|"
    r"timed out|Timeout was reached|Max retries exceeded|Could not resolve|"
    r"Name or service not known|Temporary failure in name resolution|"
    r"error sending request|error reading a body|connection closed before message completed|"
    r"IncompleteMessage|connection error",
    re.I,
)
_BUSY = re.compile(
    r"SLOW_DOWN|SlowDown|THROTTLING|Throttl|TooManyRequests|REQUEST_TIMEOUT|RequestTimeout|"
    r"SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|InternalError|HTTP status 5\d\d|"
    r"status code: 5\d\d"
)


def _kind(exc: BaseException) -> type[errors.CacheFsError]:
    """Which cachefs error `exc` is; the retry policy and `_translate` both follow it."""
    if isinstance(exc, errors.CacheFsError):
        return type(exc)
    for os_type, kind in (
        (FileNotFoundError, errors.NotFound),
        (NotADirectoryError, errors.NotADirectory),
        (IsADirectoryError, errors.IsADirectory),
        (PermissionError, errors.PermissionDenied),
        (ConnectionError, errors.Unavailable),
        (TimeoutError, errors.Unavailable),
    ):
        if isinstance(exc, os_type):
            return kind
    if isinstance(exc, OSError | ObstoreError):
        msg = str(exc)
        if _DENIED.search(msg):
            return errors.PermissionDenied
        if _MISSING.search(msg):
            return errors.NotFound
        if _UNREACHABLE.search(msg) or _BUSY.search(msg):
            return errors.Unavailable
        if "is a directory" in msg:  # LocalFileSystem.open_input_file on a dir
            return errors.IsADirectory
    return errors.CacheFsError


def _is_transient(exc: BaseException) -> bool:
    return _kind(exc).transient


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _endpoint(u: DatasetUri) -> str:
    if u.scheme == "s3":
        return f"S3 endpoint {u.options.get('endpoint_override') or 'AWS'}"
    if u.scheme == "file":
        return "local filesystem"
    if not u.host:
        return "the default HDFS namenode"
    where = f"{u.host}:{u.port}" if u.port else u.host  # no port: an HDFS name service
    return f"{'HDFS namenode' if u.scheme == 'hdfs' else 'WebHDFS'} {where}"


_TEMPLATES: dict[type[errors.CacheFsError], str] = {
    errors.NotFound: "remote path {where} does not exist",
    errors.NotADirectory: "remote path {where}: not a directory",
    errors.IsADirectory: "remote path {where} is a directory",
    errors.PermissionDenied: "permission denied for remote path {where}: {detail}",
}


def _translate(exc: BaseException, uri: DatasetUri, path: str) -> errors.CacheFsError:
    """Map a pyarrow/fsspec/OS exception to a cachefs error naming the remote path."""
    if isinstance(exc, errors.CacheFsError):
        return exc
    kind = _kind(exc)
    template = _TEMPLATES.get(kind, "remote path {where}: {detail}")
    if kind is errors.Unavailable:
        reach = isinstance(exc, ConnectionError | TimeoutError) or _UNREACHABLE.search(str(exc))
        verb = "cannot reach" if reach else "transient failure from"
        template = verb + " {endpoint} for {where}: {detail}"
    message = template.format(
        where=uri.display(path), detail=_one_line(exc), endpoint=_endpoint(uri)
    )
    return kind(message)
