"""An fsspec filesystem over cachefs.client: pandas, pyarrow, dask and HF datasets read a
cluster's datasets without FUSE.

    import fsspec, pyarrow.dataset as ds
    fs = fsspec.filesystem("cachefs", master="10.0.0.5:19470")   # secret_file=... if needed
    fs.ls("frames"), fs.glob("frames/**/*.jpg"), fs.cat_file("frames/a/b.jpg", 0, 100)
    ds.dataset("tables/train", filesystem=fs, format="parquet").to_table()
    pandas.read_parquet("cachefs://tables/t.parquet", storage_options={"master": ...})

Paths are `DATASET/path/in/dataset` (optionally `cachefs://`-prefixed); `""` lists the
datasets. Read-only: every write raises PermissionError(EROFS). The protocol is registered by
the package's `fsspec.specs` entry point, so fsspec finds it without importing cachefs.

Filesystems are fsspec-cached per (arguments, process, thread); all of them with the same
master share one Client (its own event loop, thread-safe, reset after fork()). A forked child
may keep using an inherited filesystem; a pickled one reconnects where it is unpickled.
"""

from __future__ import annotations

import datetime
import errno
import threading
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from cachefs.client import Client, Stat, clean_path
from cachefs.config import format_address, master_address

_CLIENTS: dict[tuple, Client] = {}  # (address, secret_file, timeout) -> the shared Client
_CLIENTS_LOCK = threading.Lock()


def _client(master: str | None, secret_file: str | None, timeout: float) -> Client:
    address = master_address(master)
    key = (address, secret_file, timeout)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = Client(
                format_address(address), secret_file=secret_file, timeout=timeout
            )
        return client


def _split(path: str) -> tuple[str, str]:
    """'DATASET/a/b' -> ('DATASET', 'a/b'); '..', '.' and NUL refused (ValueError)."""
    dataset, _, rel = path.partition("/")
    if dataset in (".", ".."):
        raise ValueError(f"invalid cachefs path {path!r}: no '.', '..' or NUL")
    return dataset, clean_path(rel)


def _refuse(operation: str, target: int = 0):
    """A write method: raises PermissionError(EROFS) naming its `target`-th argument."""

    def method(self, *args: Any, **kwargs: Any):
        path = args[target] if len(args) > target else None
        raise PermissionError(errno.EROFS, f"cachefs is read-only ({operation} refused)", path)

    method.__name__ = operation
    return method


class CachefsFileSystem(AbstractFileSystem):
    """fsspec's view of a cachefs cluster: top level = datasets, below = their snapshots."""

    protocol = "cachefs"
    root_marker = ""
    blocksize = 4 << 20  # a worker's block: one readahead fetch is one block read

    def __init__(
        self,
        master: str | None = None,
        secret_file: str | None = None,
        timeout: float = 60.0,
        **storage_options: Any,
    ):
        super().__init__(**storage_options)
        self.master = master
        self.client = _client(master, secret_file, timeout)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return super()._strip_protocol(path).strip("/")

    # --- metadata -------------------------------------------------------------------------

    @staticmethod
    def _entry(dataset: str, st: Stat) -> dict:
        return {
            "name": f"{dataset}/{st.path}" if st.path else dataset,
            "size": 0 if st.is_dir else st.size,
            "type": "directory" if st.is_dir else "file",
            "mtime": st.mtime_ns / 1e9,
            "etag": st.etag,
        }

    def info(self, path, **kwargs) -> dict:
        path = self._strip_protocol(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        dataset, rel = _split(path)
        return self._entry(dataset, self.client.stat(dataset, rel))

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if not path:
            entries = [
                {"name": name, "size": 0, "type": "directory"} for name in self.client.datasets()
            ]
        else:
            dataset, rel = _split(path)
            try:
                entries = [self._entry(dataset, st) for st in self.client.scandir(dataset, rel)]
            except NotADirectoryError:
                entries = [self.info(path)]  # fsspec: ls of a file is that file
        return entries if detail else [e["name"] for e in entries]

    def modified(self, path) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], datetime.UTC)

    def ukey(self, path) -> str:
        info = self.info(path)
        return f"{info['size']}:{info.get('mtime')}:{info.get('etag')}"

    # --- data -----------------------------------------------------------------------------

    def cat_file(self, path, start=None, end=None, **kwargs) -> bytes:
        dataset, rel = _split(self._strip_protocol(path))
        if start is None and end is None:
            return self.client.read_bytes(dataset, rel)
        size = self.client.stat(dataset, rel).size
        start = 0 if start is None else max(0, size + start) if start < 0 else start
        end = size if end is None else max(0, size + end) if end < 0 else end
        return self.client.read_range(dataset, rel, start, max(0, end - start))

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs) -> CachefsBufferedFile:  # fmt: skip
        path = self._strip_protocol(path)
        if mode != "rb":
            raise PermissionError(errno.EROFS, f"cachefs is read-only (open mode {mode!r})", path)
        dataset, rel = _split(path)
        raw = self.client.open(dataset, rel)
        return CachefsBufferedFile(
            self, path, raw, block_size=block_size or self.blocksize,
            cache_options=cache_options, **kwargs,
        )  # fmt: skip

    # --- read-only ------------------------------------------------------------------------

    mkdir = _refuse("mkdir")
    makedirs = _refuse("makedirs")
    rmdir = _refuse("rmdir")
    rm_file = _refuse("rm_file")
    _rm = _refuse("rm")
    rm = _refuse("rm")
    cp_file = _refuse("cp_file", 1)
    copy = _refuse("copy", 1)
    mv = _refuse("mv", 1)
    pipe_file = _refuse("pipe_file")
    pipe = _refuse("pipe")
    put_file = _refuse("put_file", 1)
    put = _refuse("put", 1)
    touch = _refuse("touch")


class CachefsBufferedFile(AbstractBufferedFile):
    """A read-only fsspec file (seek, tell, read, readinto, readline); its reads all see the
    version of the file that was current at open, through the client's data path."""

    def __init__(self, fs: CachefsFileSystem, path: str, raw, **kwargs: Any):
        self.raw = raw
        super().__init__(fs, path, mode="rb", size=raw.size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        self.raw.seek(start)
        return self.raw.read(max(0, end - start))

    def close(self) -> None:
        super().close()
        self.raw.close()
