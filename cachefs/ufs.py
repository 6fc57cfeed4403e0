"""Access to the remote store ("UFS") a dataset lives in: a local dir, S3, HDFS or WebHDFS.

Everything goes through a pyarrow filesystem (for file://, `localfs.JailedLocalFs`, which
answers the same calls but never resolves a path out of the root). Its calls block, so each
one runs in a worker thread bounded by a CapacityLimiter, under a per-call deadline, with
retries of transient failures only. Failures leave this module as `cachefs.errors` types
whose one-line messages name the remote path.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pyarrow.fs as pafs
import tenacity
import trio

from cachefs import errors, metrics
from cachefs.localfs import JailedLocalFs, LocalInfo, LocalWalk
from cachefs.ufs_errors import _endpoint, _is_transient, _one_line, _translate

_T = TypeVar("_T")

SCHEMES = ("file", "s3", "hdfs", "webhdfs")
_FORMS = "file:///abs/dir, s3://bucket/prefix, hdfs://namenode:8020/path, webhdfs://host:9870/path"

# Options each scheme accepts (URI query or `-o KEY=VALUE`), with their value types.
_OPTIONS: dict[str, dict[str, type]] = {
    "file": {},
    "s3": {
        **dict.fromkeys(
            ("endpoint_override", "scheme", "region", "access_key", "secret_key")
            + ("session_token", "role_arn", "session_name", "external_id")
            + ("proxy_options", "tls_ca_file_path"),
            str,
        ),
        **dict.fromkeys(("anonymous", "force_virtual_addressing"), bool),
        **dict.fromkeys(("connect_timeout", "request_timeout"), float),
    },
    "hdfs": {"user": str, "kerb_ticket": str, "buffer_size": int},
    "webhdfs": {
        **dict.fromkeys(("user", "password", "token"), str),
        **dict.fromkeys(("kerberos", "use_https", "session_verify"), bool),
    },
}
_URI_SAFE = "/:@!$&'()*+,;=-._~"  # characters that stay literal in a normalised URI
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    path: str  # relative POSIX path below the dataset root, never "" in listings
    is_dir: bool
    size: int  # 0 for directories
    mtime_ns: int  # 0 if unknown
    etag: str | None = None
    # Permission bits and numeric owner of a file:// entry (of a link's target); None elsewhere.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class DatasetUri:
    scheme: str
    host: str  # S3 bucket or namenode; "" for file:// (and for hdfs:// = fs.defaultFS)
    port: int | None
    path: str  # absolute dir for file/hdfs/webhdfs; key prefix without edge slashes for s3
    options: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> str:
        """The dataset root as a path for the pyarrow filesystem."""
        if self.scheme == "s3":
            return f"{self.host}/{self.path}" if self.path else self.host
        return self.path

    def display(self, rel: str = "") -> str:
        """A readable URI of `rel` below the root, for messages (never shows options)."""
        if self.scheme == "s3":
            key = "/".join(p for p in (self.path, rel) if p)
            return f"s3://{self.host}/{key}" if key else f"s3://{self.host}"
        netloc = f"{self.host}:{self.port}" if self.host and self.port else self.host
        return f"{self.scheme}://{netloc}{posixpath.join(self.path, rel) if rel else self.path}"

    @property
    def uri(self) -> str:
        """The normalised URI: it parses back to the same root (options are kept apart)."""
        scheme, rest = self.display().split("://", 1)
        return f"{scheme}://{quote(rest, safe=_URI_SAFE)}"


def _invalid(uri: str, why: str) -> errors.InvalidArgument:
    shown = uri.split("?", 1)[0]  # the query may carry secret_key: never echo it
    return errors.InvalidArgument(f"invalid dataset URI {shown!r}: {why} (supported: {_FORMS})")


def _clean_parts(path: str) -> list[str] | None:
    """Path components without "" and "."; None if there is a ".." (we never climb out)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if ".." in parts else parts


def _typed_options(scheme: str, options: dict[str, str]) -> dict[str, Any]:
    """Options converted to the types pyarrow/fsspec expect; ValueError names the bad one."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        kind = _OPTIONS[scheme][key]
        try:
            out[key] = _BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise ValueError(f"option {key}={value!r} is not a valid {kind.__name__}") from None
    if out.get("scheme", "https") not in ("http", "https"):
        raise ValueError(f"option scheme={out['scheme']!r} must be http or https")
    return out


def parse_uri(uri: str, options: dict[str, str] | None = None) -> DatasetUri:
    """Validate a dataset URI; query parameters merge with `options` (options win)."""
    try:
        parts = urlsplit(uri.strip())
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
        port = parts.port
    except (AttributeError, ValueError) as exc:
        raise _invalid(str(uri), f"malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _invalid(uri, f"unsupported scheme {scheme + '://' if scheme else '(none)'}")
    if parts.fragment:
        raise _invalid(uri, "a '#fragment' is not allowed")
    merged = {**query, **(options or {})}
    unknown = sorted(set(merged) - set(_OPTIONS[scheme]))
    if unknown:
        known = ", ".join(sorted(_OPTIONS[scheme])) or "none"
        raise _invalid(uri, f"unknown option(s) {', '.join(unknown)} for {scheme}:// ({known})")
    try:
        _typed_options(scheme, merged)
    except ValueError as exc:
        raise _invalid(uri, str(exc)) from None
    clean = _clean_parts(unquote(parts.path))
    if clean is None:
        raise _invalid(uri, "'..' is not allowed in the path")
    host = parts.netloc
    if scheme == "file":
        if host not in ("", "localhost") or not parts.path.startswith("/"):
            raise _invalid(uri, "file:// needs an absolute path, e.g. file:///data/set")
        return DatasetUri("file", "", None, "/" + "/".join(clean), merged)
    if scheme == "s3":
        # Credentials go in options or the AWS env vars, never in the URI authority.
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,62}", host):
            raise _invalid(uri, f"{host!r} is not a valid S3 bucket name")
        return DatasetUri("s3", host, None, "/".join(clean), merged)
    if "@" in host:
        raise _invalid(uri, "put the user in options (user=...), not in the URI")
    hostname = parts.hostname or ""
    if scheme == "webhdfs" and not hostname:
        raise _invalid(uri, "webhdfs:// needs a host, e.g. webhdfs://namenode:9870/path")
    default_port = 9870 if scheme == "webhdfs" else (8020 if hostname else None)
    return DatasetUri(scheme, hostname, port or default_port, "/" + "/".join(clean), merged)


def _build_filesystem(u: DatasetUri) -> tuple[pafs.FileSystem | JailedLocalFs, Any]:
    """The pyarrow filesystem for `u` (+ the fsspec object to close, if any)."""
    opts = _typed_options(u.scheme, u.options)
    try:
        if u.scheme == "file":
            return JailedLocalFs(u.root), None
        if u.scheme == "s3":
            # Small timeouts and few SDK retries: an unreachable endpoint must fail in seconds
            # (our own retries sit on top). request_timeout only works on macOS/Windows builds;
            # the per-call trio deadline is what bounds a hung request on Linux.
            opts = {"connect_timeout": 3.0, "request_timeout": 20.0, **opts}
            s3 = pafs.S3FileSystem(
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
                allow_bucket_creation=False,
                allow_bucket_deletion=False,
                **opts,
            )
            return s3, None
        if u.scheme == "hdfs":
            return pafs.HadoopFileSystem(u.host or "default", u.port or 0, **opts), None
        from fsspec.implementations.webhdfs import WebHDFS  # pure Python; only when used

        web = WebHDFS(host=u.host, port=u.port, skip_instance_cache=True, **opts)
        return pafs.PyFileSystem(_WebHdfsHandler(web)), web
    except Exception as exc:
        hint = ""
        if u.scheme == "hdfs":
            hint = " (hdfs:// needs libhdfs and a Java runtime: set JAVA_HOME and CLASSPATH)"
        raise errors.CacheFsError(f"cannot open {u.display()}: {_one_line(exc)}{hint}") from exc


class _WebHdfsHandler(pafs.FSSpecHandler):
    """fsspec's WebHDFS reports `modificationTime` (ms), not the `mtime` pyarrow looks for."""

    @staticmethod
    def _create_file_info(path: str, info: dict[str, Any]) -> pafs.FileInfo:
        if info.get("mtime") is None and info.get("modificationTime") is not None:
            epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # exact, unlike float seconds
            info = {**info, "mtime": epoch + dt.timedelta(milliseconds=info["modificationTime"])}
        return pafs.FSSpecHandler._create_file_info(path, info)


def _clean_rel(path: str) -> str:
    """A caller's path relative to the root, normalised; no way to step outside the root."""
    parts = None if path.startswith("/") or "\0" in path else _clean_parts(path)
    if parts is None:
        raise errors.InvalidArgument(
            f"invalid remote path {path!r}: must be relative to the dataset root, without '..'"
        )
    return "/".join(parts)


class RemoteStore:
    """One dataset root on a remote store; async methods are safe to call concurrently."""

    def __init__(
        self,
        uri: str,
        options: dict[str, str] | None = None,
        *,
        limiter: trio.CapacityLimiter | None = None,
        timeout: float = 30.0,
        max_attempts: int = 5,
    ):
        self._u = parse_uri(uri, options)
        self.uri = self._u.uri
        self._limiter = limiter or trio.CapacityLimiter(16)
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._fs, self._fsspec = _build_filesystem(self._u)
        self._closed = False

    def close(self) -> None:
        self._closed = True
        session = getattr(self._fsspec, "session", None)
        if session is not None:
            session.close()

    async def _run(
        self, op: str, path: str, fn: Callable[..., _T], *args: Any, retry: bool = True
    ) -> _T:
        """Run one blocking call in a thread under the deadline, retrying transient errors."""
        if self._closed:
            raise errors.CacheFsError(f"remote store {self.uri} is closed")
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._max_attempts if retry else 1),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=2),
            retry=tenacity.retry_if_exception(_is_transient),
            sleep=trio.sleep,
            reraise=True,
        )
        try:
            with trio.fail_after(self._timeout):
                async for attempt in retrying:
                    with attempt:
                        if attempt.retry_state.attempt_number > 1:
                            metrics.UFS_REQUESTS.labels("retried").inc()
                        result = await trio.to_thread.run_sync(
                            fn, *args, limiter=self._limiter, abandon_on_cancel=True
                        )
                        metrics.UFS_REQUESTS.labels("ok").inc()
                        return result
        except trio.TooSlowError:
            metrics.UFS_REQUESTS.labels("error").inc()
            raise errors.TimedOut(
                f"{op} of {self._u.display(path)} did not finish within {self._timeout:g}s "
                f"({_endpoint(self._u)})"
            ) from None
        except errors.CacheFsError:
            metrics.UFS_REQUESTS.labels("error").inc()
            raise
        except Exception as exc:
            metrics.UFS_REQUESTS.labels("error").inc()
            raise _translate(exc, self._u, path) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    # Blocking helpers: they run in threads and look up self._fs at call time.
    def _full(self, rel: str) -> str:
        if self._u.scheme == "file":
            return rel  # JailedLocalFs resolves paths beneath the root itself
        return f"{self._u.root.rstrip('/')}/{rel}" if rel else self._u.root

    def _entry(self, info: pafs.FileInfo | LocalInfo, rel: str) -> RemoteEntry | None:
        mtime = info.mtime_ns or 0
        owner = (info.mode, info.uid, info.gid) if isinstance(info, LocalInfo) else ()
        if self._u.scheme == "s3":
            # Listings carry milliseconds, HEAD only seconds: keep one resolution so a file's
            # cache key is the same whichever call produced it.
            mtime -= mtime % 1_000_000_000
        if info.type == pafs.FileType.Directory:
            return RemoteEntry(rel, True, 0, mtime, None, *owner)
        if info.type == pafs.FileType.File:
            return RemoteEntry(rel, False, info.size or 0, mtime, None, *owner)
        return None  # missing, or something that is neither file nor dir

    def _stat_sync(self, rel: str) -> RemoteEntry | None:
        return self._entry(self._fs.get_file_info(self._full(rel)), rel)

    def _walk_sync(self, walk: LocalWalk, n: int) -> list[RemoteEntry]:
        # The walk returns only files and directories, so no entry is None.
        return [e for rel, info in walk.next_batch(n) if (e := self._entry(info, rel))]

    def _list_sync(self, rel: str) -> list[RemoteEntry]:
        prefix, seen, out = f"{rel}/" if rel else "", set(), []
        for info in self._fs.get_file_info(pafs.FileSelector(self._full(rel))):
            name = info.base_name
            # S3 may show a name both as prefix and as key (or as "a//b"): keep the first.
            if name and name not in seen and (entry := self._entry(info, prefix + name)):
                seen.add(name)
                out.append(entry)
        return out

    def _read_sync(self, rel: str, offset: int, length: int | None) -> bytes:
        with self._fs.open_input_file(self._full(rel)) as f:
            if length is None:
                return f.read()
            size = f.size()
            # S3 raises on a read that starts past EOF; make every store return b"" instead.
            if offset >= size or length == 0:
                return b""
            return f.read_at(min(length, size - offset), offset)

    def _read_version_sync(
        self, rel: str, offset: int, length: int, size: int, mtime_ns: int
    ) -> bytes:
        """A read that fails unless the file is still that version once the bytes are in.

        One stat after the read is enough: a file that was another version before or during
        the read is not this version after it (mtimes only move forward).
        """

        def check_version() -> None:
            entry = self._stat_sync(rel)
            if entry is None or (entry.size, entry.mtime_ns) != (size, mtime_ns):
                raise errors.StaleVersion(self._stale_message(rel))

        try:
            data = self._read_sync(rel, offset, length)
        except OSError:
            check_version()  # replaced under us: StaleVersion, not the read's error
            raise
        check_version()
        return data

    def _stale_message(self, rel: str) -> str:
        return (
            f"{self._u.display(rel)} changed in the remote store since the last sync; "
            "run `cachefs dataset sync`"
        )

    # Public API.
    async def check(self) -> None:
        """The root must exist and be a directory."""
        entry = await self._run("check", "", self._stat_sync, "")
        if entry is None:
            raise errors.NotFound(f"remote path {self._u.display()} does not exist")
        if not entry.is_dir:
            raise errors.NotADirectory(f"remote path {self._u.display()} is not a directory")

    async def stat(self, path: str) -> RemoteEntry:
        rel = _clean_rel(path)
        entry = await self._run("stat", rel, self._stat_sync, rel)
        if entry is None:
            raise errors.NotFound(f"remote path {self._u.display(rel)} does not exist")
        return entry

    async def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`: fewer at EOF, b"" past it."""
        rel = _clean_rel(path)
        if offset < 0 or length < 0:
            raise errors.InvalidArgument(f"invalid range {offset}+{length} for {path!r}")
        data = await self._run("read", rel, self._read_sync, rel, offset, length)
        metrics.UFS_READ_BYTES.inc(len(data))
        return data

    async def read_version(
        self, path: str, offset: int, length: int, size: int, mtime_ns: int
    ) -> bytes:
        """Like read_range, but only from the file version (size, mtime) a sync recorded.

        Raises StaleVersion if the remote file is another version before or after the read,
        so a cache never stores, and a reader never gets, bytes of a version it did not ask for.
        """
        rel = _clean_rel(path)
        if offset < 0 or length < 0:
            raise errors.InvalidArgument(f"invalid range {offset}+{length} for {path!r}")
        data = await self._run(
            "read", rel, self._read_version_sync, rel, offset, length, size, mtime_ns
        )
        metrics.UFS_READ_BYTES.inc(len(data))
        return data

    async def read_file(self, path: str) -> bytes:
        rel = _clean_rel(path)
        data = await self._run("read", rel, self._read_sync, rel, 0, None)
        metrics.UFS_READ_BYTES.inc(len(data))
        return data

    async def iter_tree(self, batch_size: int = 5000) -> AsyncIterator[list[RemoteEntry]]:
        """Everything below the root, in batches of at most `batch_size` (any order).

        Memory stays bounded: a local tree is walked with os.scandir; other stores are listed
        one directory per call (for S3 a delimiter listing, so every implied directory shows
        up), several directories at a time. The deadline applies to each step, not the walk.
        """
        if batch_size < 1:
            raise errors.InvalidArgument(f"batch_size must be positive, not {batch_size}")
        if self._u.scheme == "file":
            walk = LocalWalk(self._u.root)
            try:
                # No retries: a failed step may have consumed entries, so repeating it would
                # silently skip them.
                while batch := await self._run(
                    "list", "", self._walk_sync, walk, batch_size, retry=False
                ):
                    yield batch
            finally:
                walk.close()
            return
        pending, buf = [""], []  # a stack: depth-first keeps the pending list short
        fanout = int(min(self._limiter.total_tokens, 32))
        while pending:
            dirs = [pending.pop() for _ in range(min(fanout, len(pending)))]
            for listing in await self._list_many(dirs):
                buf.extend(listing)
                pending.extend(e.path for e in listing if e.is_dir)
            while len(buf) >= batch_size:
                yield buf[:batch_size]
                del buf[:batch_size]
        if buf:
            yield buf

    async def _list_many(self, dirs: list[str]) -> list[list[RemoteEntry]]:
        """List `dirs` concurrently; the first failure cancels the rest and is raised."""
        results: list[list[RemoteEntry]] = [[] for _ in dirs]
        failures: list[errors.CacheFsError] = []

        async def one(i: int, rel: str) -> None:
            try:
                results[i] = await self._run("list", rel, self._list_sync, rel)
            except errors.CacheFsError as exc:
                if rel and isinstance(exc, errors.NotFound):
                    return  # a directory removed while we walk: nothing below it any more
                failures.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for i, rel in enumerate(dirs):
                nursery.start_soon(one, i, rel)
        if failures:
            raise failures[0]
        return results
