"""Python access to a cluster's datasets without FUSE: training scripts read through this.

    from cachefs.client import Client
    with Client("10.0.0.5:19470") as c:       # a master (or an embedded mount's master)
        data = c.read_bytes("frames", "class_000/video_00000/img_00001.jpg")
        with c.open("frames", "a/b.jpg") as f:  # read, readinto, seek
            f.seek(10); head = f.read(100)
        c.stat("frames", "a"), c.listdir("frames", "a"), list(c.walk("frames"))

Authentication is the CLI's: `secret_file`, else $CACHEFS_SECRET_FILE, else the secret a master
on this host published for its port (same user); `tls` as `cachefs.tls.TlsConfig`.

Reads take the mount's data path (fuse/reader.py `DataReader`, the same version rules): a small
file a worker of this host holds in RAM is read in the calling thread straight from the worker's
files (short-circuit, no event loop hop); anything else goes to the ranked workers over RPC,
then to the store. Metadata comes from the master's namespace snapshot; a path's attributes are
kept `attr_ttl` seconds (as a mount keeps its kernel entries).

Calls block the calling thread, any number of threads at once: one trio event loop in a daemon
thread does the I/O, each call under `timeout`. After fork() (DataLoader workers fork once the
Dataset is built), the child's first call starts its own loop and connections; the parent's are
neither used nor closed there. Errors are OSErrors with the cachefs errno (FileNotFoundError, ...).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

import trio

from cachefs import errors
from cachefs.config import parse_address
from cachefs.credentials import client_secret
from cachefs.fuse.reader import DataReader
from cachefs.meta import MAX_READ, Attr
from cachefs.rpc import RpcClient
from cachefs.tls import TlsConfig
from cachefs.ufs import RemoteStore
from cachefs.workers import WorkerDirectory

ATTR_CACHE_MAX = 1 << 18  # paths whose attributes a client keeps
PREFETCH_WINDOW = 64  # files an order hint keeps in flight ahead of the readers
HINT_BYTES = 256 << 10  # path text per hint: a call's arguments are capped at 1 MiB


class Stat(NamedTuple):
    """A file or directory of a dataset's snapshot."""

    path: str  # relative to the dataset root, no leading slash
    is_dir: bool
    size: int
    mtime_ns: int
    etag: str | None


def clean_path(path: str) -> str:
    """`path` relative to a dataset root: no '.', '..' or empty components (never leaves it)."""
    parts = [p for p in str(path).split("/") if p]
    if any(p in (".", "..") for p in parts) or "\0" in str(path):
        raise ValueError(f"invalid dataset path {path!r}: no '.', '..' or NUL")
    return "/".join(parts)


def _os_error(exc: errors.CacheFsError) -> OSError:
    """The one place a cachefs error becomes what Python callers catch."""
    return OSError(exc.errno, exc.message)  # OSError(ENOENT, ...) is a FileNotFoundError


def _stat(path: str, attr: Attr) -> Stat:
    return Stat(path, attr.is_dir, attr.size, attr.mtime_ns, attr.etag)


class _Loop:
    """The client's event loop in a daemon thread, holding the connections of one process."""

    def __init__(self, client: Client):
        self._client = client
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.readers: dict[str, DataReader] = {}
        self._stores: dict[str, RemoteStore] = {}
        self.thread = threading.Thread(target=self._run, name="cachefs-client", daemon=True)
        self.thread.start()
        self._ready.wait()
        failure = self._failure
        while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
            failure = failure.exceptions[0]
        if isinstance(failure, errors.CacheFsError):
            raise _os_error(failure) from None
        if isinstance(failure, trio.TooSlowError):
            raise TimeoutError(f"the master did not answer within {client.timeout:g}s") from None
        if failure is not None:
            raise failure

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the constructor's caller
            self._failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        c = self._client
        async with contextlib.AsyncExitStack() as stack:
            self.master = await stack.enter_async_context(
                RpcClient(c.address, secret=c.secret, tls=c.tls, name="master", timeout=c.timeout)
            )
            self.workers = await stack.enter_async_context(
                WorkerDirectory(
                    functools.partial(self.master.call, "workers"), secret=c.secret, tls=c.tls
                )
            )
            with trio.fail_after(c.timeout):
                await self.workers.update()
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(self.workers.run)
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
            for store in self._stores.values():
                store.close()

    def call(self, fn, *args: Any) -> Any:
        """`await fn(*args)` in the loop, under the client's timeout; errors as OSErrors."""

        async def bounded():
            with trio.fail_after(self._client.timeout):
                return await fn(*args)

        try:
            return trio.from_thread.run(bounded, trio_token=self._token)
        except trio.TooSlowError:
            raise TimeoutError(f"no answer within {self._client.timeout:g}s") from None
        except errors.CacheFsError as exc:
            raise _os_error(exc) from None
        except trio.RunFinishedError:
            raise OSError(errors.Unavailable.errno, "the cachefs client is closed") from None

    def reader(self, dataset: str) -> DataReader:
        """The dataset's DataReader (two threads may both make one: the last one stays)."""
        reader = self.readers.get(dataset)
        if reader is None:
            reader = self.readers[dataset] = DataReader(
                dataset, self.workers, functools.partial(self._store, dataset)
            )
        return reader

    async def _store(self, dataset: str) -> RemoteStore:
        if dataset not in self._stores:
            spec = await self.master.call("dataset_spec", name=dataset)
            if dataset not in self._stores:  # another read may have made it meanwhile
                self._stores[dataset] = RemoteStore(spec["uri"], spec["options"])
        return self._stores[dataset]

    def close(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self.thread.join(10)


class Client:
    """A connection to one cachefs cluster (see the module's docstring)."""

    def __init__(
        self,
        master: str,
        *,
        secret_file: str | None = None,
        tls: TlsConfig | None = None,
        timeout: float = 60.0,
        attr_ttl: float = 3600.0,
    ):
        self.address = parse_address(master)
        self.secret = client_secret(secret_file, self.address)
        self.tls = tls
        self.timeout = timeout
        self.attr_ttl = attr_ttl
        self._reset()
        _CLIENTS.add(self)

    def _reset(self) -> None:
        """A fresh start: new process (fork), or closed."""
        self._lock = threading.Lock()
        self._loop: _Loop | None = None
        self._pid = os.getpid()
        self._attrs: OrderedDict[tuple[str, str], tuple[Attr, float]] = OrderedDict()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes this process's connections; a later call opens new ones."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None and self._pid == os.getpid():
            loop.close()

    def _after_fork(self) -> None:
        self._reset()  # the parent's loop thread does not exist here; its sockets stay unused

    @property
    def _io(self) -> _Loop:
        loop = self._loop
        if loop is None:
            with self._lock:
                if self._loop is None:
                    self._loop = _Loop(self)
                loop = self._loop
        return loop

    # --- metadata -------------------------------------------------------------------------

    def attr(self, dataset: str, path: str) -> Attr:
        """The snapshot's attributes of a path (what `read_attr` takes)."""
        return self._attr(dataset, path)

    def _attr(self, dataset: str, path: str) -> Attr:
        rel = clean_path(path)
        now = _now()
        hit = self._attrs.get((dataset, rel))
        if hit is not None and hit[1] > now:
            return hit[0]
        attr = Attr.from_wire(self._master("lookup_path", dataset=dataset, path=rel))
        self._remember(dataset, rel, attr, now)
        return attr

    def _remember(self, dataset: str, rel: str, attr: Attr, now: float) -> None:
        with self._lock:
            self._attrs[(dataset, rel)] = (attr, now + self.attr_ttl)
            while len(self._attrs) > ATTR_CACHE_MAX:
                self._attrs.popitem(last=False)

    def _master(self, method: str, **args: Any) -> Any:
        io_ = self._io
        return io_.call(functools.partial(io_.master.call, method, **args))

    def datasets(self) -> list[str]:
        """The names of the cluster's datasets, sorted."""
        return [info["name"] for info in self._master("dataset_list")]

    def stat(self, dataset: str, path: str = "") -> Stat:
        return _stat(clean_path(path), self._attr(dataset, path))

    def scandir(self, dataset: str, path: str = "") -> list[Stat]:
        """The entries of a directory, in name order."""
        rel = clean_path(path)
        attr = self._attr(dataset, rel)
        if not attr.is_dir:
            raise NotADirectoryError(f"{dataset}/{rel} is not a directory")
        out, after, now = [], None, _now()
        while True:
            page = self._master("readdir", dataset=dataset, ino=attr.ino, after=after)
            for name, wire in page["entries"]:
                child = Attr.from_wire(wire)
                child_rel = f"{rel}/{name}" if rel else name
                self._remember(dataset, child_rel, child, now)
                out.append(_stat(child_rel, child))
                after = name
            if not page["more"]:
                return out

    def listdir(self, dataset: str, path: str = "") -> list[str]:
        return [s.path.rsplit("/", 1)[-1] for s in self.scandir(dataset, path)]

    def walk(self, dataset: str, path: str = "") -> Iterator[tuple[str, list[str], list[str]]]:
        """(dirpath, dirnames, filenames) top-down, as os.walk (dirnames may be pruned)."""
        rel = clean_path(path)
        entries = self.scandir(dataset, rel)
        dirs = [e.path.rsplit("/", 1)[-1] for e in entries if e.is_dir]
        yield rel, dirs, [e.path.rsplit("/", 1)[-1] for e in entries if not e.is_dir]
        for name in dirs:
            yield from self.walk(dataset, f"{rel}/{name}" if rel else name)

    def files(self, dataset: str, path: str = "") -> list[Stat]:
        """Every file below `path`, in walk order."""
        rel = clean_path(path)
        out = []
        for entry in self.scandir(dataset, rel):
            out.extend(self.files(dataset, entry.path) if entry.is_dir else [entry])
        return out

    # --- data -----------------------------------------------------------------------------

    def read_range(self, dataset: str, path: str, offset: int = 0, length: int = -1) -> bytes:
        """Bytes [offset, offset+length) of a file (length -1: to its end)."""
        rel = clean_path(path)
        attr = self._attr(dataset, rel)
        return self.read_attr(dataset, rel, attr, offset, length)

    def read_bytes(self, dataset: str, path: str) -> bytes:
        return self.read_range(dataset, path)

    def read_attr(self, dataset: str, rel: str, attr: Attr, offset: int = 0,
                  length: int = -1) -> bytes:  # fmt: skip
        """As read_range, for a path whose attributes the caller has (CachefsDataset)."""
        if attr.is_dir:
            raise IsADirectoryError(f"{dataset}/{rel} is a directory")
        if offset < 0:
            raise ValueError("negative offset")
        end = attr.size if length < 0 else min(attr.size, offset + length)
        if offset >= end:
            return b""
        io_ = self._io
        reader = io_.reader(dataset)
        data = reader.read_now(rel, attr, offset, end - offset)
        if data is not None:
            return bytes(data)
        return io_.call(_read, reader, rel, attr, offset, end)

    def open(self, dataset: str, path: str) -> CachefsFile:
        """A read-only binary file object (read, readinto, seek, tell)."""
        rel = clean_path(path)
        attr = self._attr(dataset, rel)
        if attr.is_dir:
            raise IsADirectoryError(f"{dataset}/{rel} is a directory")
        return CachefsFile(self, dataset, rel, attr)

    # --- hints ----------------------------------------------------------------------------

    def prefetch(self, dataset: str, order: list[str], window: int = PREFETCH_WINDOW) -> int:
        """Hands an epoch's read order to the cluster (as `cachefs prefetch --order`): workers
        fetch ahead of the readers, in that order, at most `window` files in flight. Returns
        the load job's id."""
        files = [clean_path(p) for p in order]
        if sum(len(f) + 1 for f in files) > HINT_BYTES:
            raise ValueError(
                f"an order of {len(files)} paths is too long for one hint (at most "
                f"{HINT_BYTES >> 10} KiB of paths): send it in parts, as EpochPrefetchSampler does"
            )
        job = self._master("load_start", dataset=dataset, files=files, window=window)
        return int(job["id"])


async def _read(reader: DataReader, rel: str, attr: Attr, offset: int, end: int) -> bytes:
    """[offset, end) through the reader, in pieces one read call may carry (the worker fetches
    a piece's blocks at once, and a short-circuit read takes whole cached blocks)."""
    return b"".join(
        [await reader.read(rel, attr, lo, min(end, lo + MAX_READ) - lo)
         for lo in range(offset, end, MAX_READ)]
    )  # fmt: skip


_now = time.monotonic


class CachefsFile(io.RawIOBase):
    """One file of a dataset, read-only; reads go through the client's data path."""

    def __init__(self, client: Client, dataset: str, rel: str, attr: Attr):
        super().__init__()
        self._client, self.dataset, self.path, self._attr = client, dataset, rel, attr
        self._pos = 0
        self.name = f"{dataset}/{rel}"

    @property
    def size(self) -> int:
        return self._attr.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._attr.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        data = self._client.read_attr(self.dataset, self.path, self._attr, self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)


_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for client in list(_CLIENTS):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
