"""Access to the remote store ("UFS") a dataset lives in: a local dir, S3, HDFS or WebHDFS.

S3 goes through obstore (cachefs.ufs_s3: one GET per cold read, flat listings); the others
through a pyarrow filesystem (for file://, `localfs.JailedLocalFs`, which answers the same
calls but never resolves a path out of the root). The calls block, so each runs in a thread,
at most `limiter` at once, under a per-call deadline, with retries (backoff and jitter) of
transient failures only; a GET that is slow beyond the recent tail gets a hedged twin. Failures
leave this module as `cachefs.errors` types whose one-line messages name the remote path.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pyarrow.fs as pafs
import trio

from cachefs import errors, metrics
from cachefs.hedging import HedgePolicy
from cachefs.localfs import JailedLocalFs, LocalInfo, LocalWalk
from cachefs.ufs_errors import _endpoint, _is_transient, _one_line, _translate
from cachefs.ufs_hdfs import HdfsObjects
from cachefs.ufs_s3 import S3Objects
from cachefs.ufs_uri import (  # noqa: F401 - the names callers import from here
    SCHEMES,
    DatasetUri,
    RemoteEntry,
    _clean_parts,
    _typed_options,
    parse_uri,
)

_T = TypeVar("_T")
# Counters looked up once: labels() per call costs more than the increment.
_OK, _RETRIED, _ERROR = (metrics.UFS_REQUESTS.labels(k) for k in ("ok", "retried", "error"))


def _take(entries: Iterator[RemoteEntry], n: int) -> list[RemoteEntry]:
    """Up to n entries of a walk (a blocking step: it runs in a thread)."""
    return list(itertools.islice(entries, n))


def _open_hdfs(u: DatasetUri) -> HdfsObjects:
    try:
        return HdfsObjects(u)
    except Exception as exc:  # a bad URL or configuration: one line, no traceback
        raise errors.CacheFsError(f"cannot open {u.display()}: {_one_line(exc)}") from exc


def _build_filesystem(u: DatasetUri) -> tuple[pafs.FileSystem | JailedLocalFs, Any]:
    """The pyarrow filesystem for `u` (+ the fsspec object to close, if any)."""
    opts = _typed_options(u.scheme, u.options)
    try:
        if u.scheme == "file":
            return JailedLocalFs(u.root), None
        if u.scheme == "hdfs":  # libhdfs, on request (client=libhdfs): needs a JVM
            libhdfs = {k: v for k, v in opts.items() if k in ("user", "kerb_ticket", "buffer_size")}
            return pafs.HadoopFileSystem(u.host or "default", u.port or 0, **libhdfs), None
        from fsspec.implementations.webhdfs import WebHDFS  # pure Python; only when used

        web = WebHDFS(host=u.host, port=u.port, skip_instance_cache=True, **opts)
        return pafs.PyFileSystem(_WebHdfsHandler(web)), web
    except Exception as exc:
        hint = ""
        if u.scheme == "hdfs":
            hint = " (client=libhdfs needs libhdfs and a Java runtime: set JAVA_HOME and CLASSPATH)"
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
        max_attempts: int = 10,
    ):
        self._u = parse_uri(uri, options)
        self.uri = self._u.uri
        # Calls in flight. A call given up on (deadline, lost hedge) frees its slot at once;
        # its thread runs on until the request ends, and `_threads` bounds those.
        self._limiter = limiter or trio.CapacityLimiter(16)
        self._threads = trio.CapacityLimiter(max(64, 4 * int(self._limiter.total_tokens)))
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._hedge = HedgePolicy()
        self._s3: S3Objects | None = None
        self._hdfs: HdfsObjects | None = None
        self._fs: Any = None
        self._fsspec: Any = None
        if self._u.scheme == "s3":
            self._s3 = S3Objects(self._u, timeout, self._stale_message)
        elif self._u.scheme == "hdfs" and self._u.options.get("client", "native") == "native":
            self._hdfs = _open_hdfs(self._u)
        else:
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
        attempts = self._max_attempts if retry else 1
        try:
            with trio.fail_after(self._timeout):
                for attempt in range(1, attempts + 1):
                    try:
                        async with self._limiter:
                            result = await trio.to_thread.run_sync(
                                fn, *args, limiter=self._threads, abandon_on_cancel=True
                            )
                    except Exception as exc:
                        if attempt == attempts or not _is_transient(exc):
                            raise
                        _RETRIED.inc()
                        # Exponential backoff with full jitter (50 ms doubling, at most 2 s).
                        await trio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
                        continue
                    _OK.inc()
                    return result
        except trio.TooSlowError:
            _ERROR.inc()
            raise errors.TimedOut(
                f"{op} of {self._u.display(path)} did not finish within {self._timeout:g}s "
                f"({_endpoint(self._u)})"
            ) from None
        except errors.CacheFsError:
            _ERROR.inc()
            raise
        except Exception as exc:
            _ERROR.inc()
            raise _translate(exc, self._u, path) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    # Blocking helpers: they run in threads and look up self._fs at call time.
    def _full(self, rel: str) -> str:
        if self._u.scheme == "file":
            return rel  # JailedLocalFs resolves paths beneath the root itself
        return f"{self._u.root.rstrip('/')}/{rel}" if rel else self._u.root

    def _entry(self, info: pafs.FileInfo | LocalInfo, rel: str) -> RemoteEntry | None:
        mtime = info.mtime_ns or 0
        owner = (info.mode, info.uid, info.gid) if isinstance(info, LocalInfo) else ()
        if info.type == pafs.FileType.Directory:
            return RemoteEntry(rel, True, 0, mtime, None, *owner)
        if info.type == pafs.FileType.File:
            return RemoteEntry(rel, False, info.size or 0, mtime, None, *owner)
        return None  # missing, or something that is neither file nor dir

    def _stat_sync(self, rel: str) -> RemoteEntry | None:
        if self._s3 is not None:
            return self._s3.stat(rel)
        if self._hdfs is not None:
            return self._hdfs.stat(rel)
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
        if self._s3 is not None:
            return self._s3.get(rel, offset, length)
        if self._hdfs is not None:
            return self._hdfs.read(rel, offset, length)
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
        self, path: str, offset: int, length: int, size: int, mtime_ns: int,
        etag: str | None = None,
    ) -> bytes:  # fmt: skip
        """Like read_range, but only from the file version (size, mtime, etag) a sync recorded.

        Raises StaleVersion if the remote file is another version, so a cache never stores,
        and a reader never gets, bytes of a version it did not ask for. On S3 this is one GET
        (the version checked on its answer), hedged when it is slow.
        """
        rel = _clean_rel(path)
        if offset < 0 or length < 0:
            raise errors.InvalidArgument(f"invalid range {offset}+{length} for {path!r}")
        if self._s3 is not None:
            expect = (size, mtime_ns, etag)
            data = await self._hedged(rel, self._s3.get, rel, offset, length, expect)
        else:
            data = await self._run(
                "read", rel, self._read_version_sync, rel, offset, length, size, mtime_ns
            )
        metrics.UFS_READ_BYTES.inc(len(data))
        return data

    async def _hedged(self, rel: str, fn: Callable[..., bytes], *args: Any) -> bytes:
        """`fn` under `_run`; if it is slower than the policy allows, a second one races it.
        The first answer wins and the other is abandoned (its slot freed at once)."""
        wait = self._hedge.delay()
        answers: list[bytes] = []
        failures: list[errors.CacheFsError] = []

        async def attempt(after: float, done: trio.CancelScope) -> None:
            if after:
                await trio.sleep(after)
                if not self._hedge.take_hedge():
                    return  # over budget: the store is slow for every GET, not for this one
                metrics.UFS_REQUESTS.labels("hedged").inc()
            else:
                self._hedge.started()
            started = time.monotonic()
            try:
                answers.append(await self._run("read", rel, fn, *args))
            except errors.CacheFsError as exc:
                failures.append(exc)  # final: transient ones were retried inside _run
            else:
                self._hedge.record(time.monotonic() - started)
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, 0.0, nursery.cancel_scope)
            if wait is not None:
                nursery.start_soon(attempt, wait, nursery.cancel_scope)
        if answers:
            return answers[0]
        raise failures[0]

    async def read_file(self, path: str) -> bytes:
        rel = _clean_rel(path)
        data = await self._run("read", rel, self._read_sync, rel, 0, None)
        metrics.UFS_READ_BYTES.inc(len(data))
        return data

    async def iter_tree(self, batch_size: int = 5000) -> AsyncIterator[list[RemoteEntry]]:
        """Everything below the root, in batches of at most `batch_size` (any order).

        Memory stays bounded (by the number of directories at most): a local tree is walked
        with os.scandir; S3 is listed flat, 1,000 keys per request; HDFS by hdfs-native's
        recursive listing, a batch per step; WebHDFS (and libhdfs) one directory per call,
        several at a time. The deadline applies to each step, not the walk.
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
        if self._s3 is not None:
            async for batch in self._iter_flat(batch_size):
                yield batch
            return
        if self._hdfs is not None:
            walk = self._hdfs.walk()
            # No retries: a failed step may have consumed entries (as for a local tree).
            while batch := await self._run(
                "list", "", _take, walk, batch_size, retry=False
            ):
                yield batch
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

    async def _iter_flat(self, batch_size: int) -> AsyncIterator[list[RemoteEntry]]:
        """An object store's keys, 1,000 per request; directories implied by the keys (each
        one before the first file below it)."""
        after: str | None = None
        seen_dirs: set[str] = set()
        buf: list[RemoteEntry] = []
        while True:
            page, after = await self._run("list", "", self._s3.list_page, after)
            for entry in page:
                parts = entry.path.split("/")
                for depth in range(1, len(parts)):
                    parent = "/".join(parts[:depth])
                    if parent not in seen_dirs:
                        seen_dirs.add(parent)
                        buf.append(RemoteEntry(parent, True, 0, 0))
                buf.append(entry)
            while len(buf) >= batch_size or (buf and after is None):
                yield buf[:batch_size]
                del buf[:batch_size]
            if after is None:
                return

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
