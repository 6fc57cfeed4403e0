"""S3 (and S3-compatible stores) through obstore, Apache Arrow's Rust object_store client.

Why not pyarrow's S3 filesystem: its reads send a HEAD before the GET and return no response
headers, so a version check costs a second request. Here a cold read is one GET: the response's
ETag (or size and Last-Modified) is checked against the version the sync recorded, and with a
known ETag the GET is conditional (If-Match), so the store itself refuses a changed object.
Listings are flat (ListObjectsV2 without a delimiter, 1,000 keys per request) and record ETags.

The calls block; cachefs.ufs runs them in threads under its deadline and retry policy, so
obstore's own retries are off (one policy for every request kind).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from typing import Any

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import PreconditionError
from obstore.store import S3Store

from cachefs import errors
from cachefs.ufs_uri import DatasetUri, RemoteEntry, _typed_options

LIST_PAGE = 1000  # keys per ListObjectsV2 request (the S3 maximum)
# pyarrow-style option names -> obstore's S3 config names
_CONFIG_NAMES = {
    "region": "region",
    "access_key": "access_key_id",
    "secret_key": "secret_access_key",
    "session_token": "session_token",
    "role_arn": "role_arn",
    "session_name": "role_session_name",
    "anonymous": "skip_signature",
    "force_virtual_addressing": "virtual_hosted_style_request",
}


def open_s3(u: DatasetUri, timeout: float) -> S3Store:
    """The S3 client for a dataset root; `timeout` bounds each HTTP request."""
    opts = _typed_options("s3", u.options)
    if "external_id" in opts:
        raise errors.InvalidArgument(
            "option external_id is not supported for s3:// (use a role without one, or "
            "credentials in the AWS_* environment variables)"
        )
    config: dict[str, Any] = {_CONFIG_NAMES[k]: v for k, v in opts.items() if k in _CONFIG_NAMES}
    if "region" not in config:
        config["region"] = (
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
    scheme = opts.get("scheme", "https")
    if "endpoint_override" in opts:
        config["endpoint"] = f"{scheme}://{opts['endpoint_override']}"
    client: dict[str, Any] = {
        "allow_http": scheme == "http",
        "connect_timeout": dt.timedelta(seconds=opts.get("connect_timeout", 3.0)),
        "timeout": dt.timedelta(seconds=opts.get("request_timeout", timeout)),
        "pool_max_idle_per_host": "64",
    }
    if "proxy_options" in opts:
        client["proxy_url"] = opts["proxy_options"]
    if "tls_ca_file_path" in opts:
        with open(opts["tls_ca_file_path"], "rb") as pem:
            client["root_certificate"] = pem.read()
    return S3Store(
        u.host,
        config=config,
        client_options=client,
        retry_config={"max_retries": 0, "retry_timeout": dt.timedelta(seconds=timeout)},
    )


def _seconds_ns(when: dt.datetime) -> int:
    # Listings carry milliseconds, GET headers only seconds: one resolution for both, so a
    # file's cache key is the same whichever call produced it.
    return int(when.timestamp()) * 1_000_000_000


def _file_entry(rel: str, meta: Any) -> RemoteEntry:
    return RemoteEntry(rel, False, meta["size"], _seconds_ns(meta["last_modified"]), meta["e_tag"])


def _clean_key(key: str) -> list[str] | None:
    """The components of a listed key, or None for one no POSIX path can name."""
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


class S3Objects:
    """Blocking S3 calls below one dataset root (paths are relative to it)."""

    def __init__(self, u: DatasetUri, timeout: float, stale_message: Callable[[str], str]):
        self._store = open_s3(u, timeout)
        self._prefix = f"{u.path}/" if u.path else ""  # keys below the root start with it
        self._stale_message = stale_message

    def _key(self, rel: str) -> str:
        return self._prefix + rel if rel else self._prefix.rstrip("/")

    def stat(self, rel: str) -> RemoteEntry | None:
        key = self._key(rel)
        if key:
            try:
                return _file_entry(rel, obstore.head(self._store, key))
            except FileNotFoundError:
                pass
        # A directory is a prefix with something below it; a bucket exists if it lists.
        below = f"{key}/" if key else None
        page = next(iter(obstore.list(self._store, below, chunk_size=1)), [])
        return RemoteEntry(rel, True, 0, 0) if page or not key else None

    def list_page(self, after: str | None) -> tuple[list[RemoteEntry], str | None]:
        """One ListObjectsV2 request: the files after key `after`, and the key to go on from
        (None at the end). Directories are not in it: the caller implies them from the keys."""
        start = self._prefix + after if after is not None else None
        stream = obstore.list(self._store, self._prefix or None, offset=start, chunk_size=LIST_PAGE)
        try:
            page = next(iter(stream), [])
        finally:
            del stream  # the rest of the listing is never fetched
        out = []
        for meta in page:
            rel = meta["path"][len(self._prefix) :]
            if _clean_key(rel) is not None:
                out.append(_file_entry(rel, meta))
        last = page[-1]["path"][len(self._prefix) :] if len(page) == LIST_PAGE else None
        return out, last

    def get(self, rel: str, offset: int, length: int | None, expect: tuple | None = None) -> bytes:
        """Bytes [offset, offset+length) in one GET (the whole object if length is None).

        With `expect` = (size, mtime_ns, etag) the GET serves only that version: StaleVersion
        if the object the store answered with is another one.
        """
        options: dict[str, Any] = {}
        if expect is not None:
            size, mtime_ns, etag = expect
            if offset >= size or length == 0:
                return b""
            length = min(size - offset, length if length is not None else size)
            if etag:
                options["if_match"] = etag
        if length is not None:
            if length == 0:
                return b""
            options["range"] = (offset, offset + length)
        elif offset:
            options["range"] = {"offset": offset}
        try:
            result = obstore.get(self._store, self._key(rel), options=options)
            meta = result.meta
            data = bytes(result.bytes())
        except PreconditionError:
            raise errors.StaleVersion(self._stale_message(rel)) from None
        except (OSError, ObstoreError) as exc:
            if length is not None and expect is None and "416" in str(exc).split("\n", 1)[0]:
                return b""  # a range that starts at or past the end
            raise
        if expect is not None:
            same = meta["size"] == size and (
                meta["e_tag"] == etag if etag else _seconds_ns(meta["last_modified"]) == mtime_ns
            )
            if not same or len(data) != length:
                raise errors.StaleVersion(self._stale_message(rel))
        return data
