"""The client's data path: which worker to ask, fallbacks, whole-file and block reads.

Order of sources for a file: its rendezvous owner, then the next-ranked live workers, then the
remote store directly, so a dead worker costs latency, not errors.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from cachefs import metrics
from cachefs.errors import CacheFsError, InvalidArgument, NotFound, Unavailable
from cachefs.meta import BLOCK_SIZE, Attr, block_key, cache_key
from cachefs.ufs import RemoteStore
from cachefs.workers import WorkerDirectory

log = logging.getLogger("cachefs.fuse.reader")

READAHEAD_BLOCKS = 2
HANDLE_BLOCKS = 4  # blocks a file's reader keeps (current + readahead)
MAX_READERS = 64  # files read at once per serving process; the least recently read go first


class DataReader:
    """Reads byte ranges of one dataset's files through the workers."""

    def __init__(
        self,
        dataset: str,
        workers: WorkerDirectory,
        direct: Callable[[], Awaitable[RemoteStore]],
    ):
        self.dataset = dataset
        self.workers = workers
        self._direct = direct
        self.direct_reads = 0
        # Called with the path of a read the cache did not have (fuse/prefetch.py), if set.
        self.on_miss: Callable[[str], None] | None = None

    def key(self, path: str, attr: Attr) -> bytes:
        return cache_key(self.dataset, path, attr.size, attr.mtime_ns, attr.etag)

    async def read(self, path: str, attr: Attr, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of this version of the file, from the best source."""
        key = self.key(path, attr)
        ranked = self.workers.ranked(key)
        if self.workers.local_tokens:
            data = await self._short_circuit(ranked, key, attr.size, offset, length)
            if data is not None:
                return data
        for position, worker_id in enumerate(ranked):
            if position:  # the previous worker failed
                metrics.READ_FALLBACKS.add("next_worker")
            try:
                client = await self.workers.client(worker_id)
                header, data = await client.call_with_payload(
                    "read", dataset=self.dataset, path=path, size=attr.size,
                    mtime_ns=attr.mtime_ns, etag=attr.etag, offset=offset, length=length,
                )  # fmt: skip
                if self.on_miss is not None and not header.get("hit", True):
                    self.on_miss(path)
                return data
            except (Unavailable, KeyError) as exc:  # KeyError: the worker left meanwhile
                log.info("worker %s failed (%s); trying the next source", worker_id, exc)
                self.workers.suspect(worker_id)
            except (NotFound, InvalidArgument):
                raise
            except CacheFsError as exc:
                # A worker-side failure (e.g. remote error during its fill): the next source
                # may still succeed, and the direct read reports the real remote error.
                log.info("worker %s could not serve %s: %s", worker_id, path, exc.message)
        self.direct_reads += 1
        metrics.READ_FALLBACKS.add("store")
        remote = await self._direct()
        return await remote.read_version(
            path, offset, length, attr.size, attr.mtime_ns, attr.etag
        )

    def read_now(
        self, path: str, attr: Attr, offset: int, length: int
    ) -> bytes | memoryview | None:
        """A small file's range if a worker of this host has it in RAM, without waiting: the
        whole request is then answered inline (no task, no deadline scope). None: `read`.

        From a worker in this process, a view of its RAM tier (no copy): valid until this
        thread runs other code, so the caller replies with it before awaiting anything."""
        if attr.size > BLOCK_SIZE or offset >= attr.size:
            return None
        key = self.key(path, attr)
        sc = self.workers.shortcircuit
        for worker_id in self.workers.ranked(key):
            local = self.workers.local.get(worker_id)
            if local is not None:  # embedded mode: the worker lives in this process
                data = local.handler.read_now(self.dataset, key, attr.size)
            elif (token := self.workers.local_tokens.get(worker_id)) is not None:
                data = sc.read_sync(worker_id, token, key, memory_only=True)
            else:
                continue
            if data is None or len(data) != attr.size:
                continue
            if local is None:  # the worker learns of it with the next `touched` report
                sc.note_served(worker_id, self.dataset, [key], attr.size)
            return data[offset : offset + length]  # the whole file: slices to itself, no copy
        return None

    async def _short_circuit(
        self, ranked: list[str], key: bytes, size: int, offset: int, length: int
    ) -> bytes | None:
        """The range from a same-host worker's files, or None: the RPC serves (and fills) it.

        Whole cached objects only: the file for small ones, each 4 MiB block for large ones.
        """
        end = min(offset + length, size)
        if offset >= end:
            return None
        if size <= BLOCK_SIZE:
            objects = [(key, 0)]
        else:
            first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
            objects = [(block_key(key, i), i * BLOCK_SIZE) for i in range(first, last + 1)]
        sc = self.workers.shortcircuit
        for worker_id in ranked:
            token = self.workers.local_tokens.get(worker_id)
            if token is None:
                continue
            parts = []
            for object_key, start in objects:
                data = await sc.read(worker_id, token, object_key)
                if data is None or len(data) != min(BLOCK_SIZE, size - start):
                    break
                parts.append(data[max(offset, start) - start : end - start])
            else:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                sc.note_served(worker_id, self.dataset, [k for k, _ in objects], len(data))
                return data
        return None

    async def cached_bytes(self, path: str, attr: Attr) -> tuple[int, str | None]:
        """(bytes of this file in the owner's cache, owner id) — for the xattrs."""
        ranked = self.workers.ranked(self.key(path, attr))
        if not ranked:
            return 0, None
        client = await self.workers.client(ranked[0])
        cached = await client.call(
            "cached", dataset=self.dataset, path=path, size=attr.size,
            mtime_ns=attr.mtime_ns, etag=attr.etag,
        )  # fmt: skip
        return cached, ranked[0]


class FileReaders:
    """The files being read, by inode (reads carry no handle: zero-message open).

    Concurrent reads of a file share its reader (one fetch per block). A small file's reader
    goes once a read reaches its end: the kernel's page cache has the bytes from then on.
    """

    def __init__(self, reader: DataReader, nursery: trio.Nursery):
        self._reader = reader
        self._nursery = nursery
        self._readers: OrderedDict[int, FileReader] = OrderedDict()

    async def read(self, ino: int, path: str, attr: Attr, offset: int, size: int) -> bytes:
        file = self._readers.get(ino)
        if file is None:
            file = self._readers[ino] = FileReader(self._reader, path, attr, self._nursery)
            if len(self._readers) > MAX_READERS:
                self._readers.popitem(last=False)
        else:
            self._readers.move_to_end(ino)
        data = await file.read(offset, size)
        read_to_end = attr.size <= BLOCK_SIZE and offset + size >= attr.size
        if read_to_end and self._readers.get(ino) is file:
            del self._readers[ino]
        return data


class FileReader:
    """One file's reads: the whole file for small ones, a few blocks with readahead for large."""

    def __init__(self, reader: DataReader, path: str, attr: Attr, nursery: trio.Nursery):
        self.reader = reader
        self.path = path
        self.attr = attr
        self._nursery = nursery
        self._blocks: dict[int, _Block] = {}
        self._next_expected = 0

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.attr.size)
        if offset >= end:
            return b""
        if self.attr.size <= BLOCK_SIZE:  # one "block": the whole file, fetched once
            data = await self._block(0)
            return data[offset:end]
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        sequential = offset == self._next_expected
        self._next_expected = end
        if sequential:
            for i in range(last + 1, last + 1 + READAHEAD_BLOCKS):
                if i * BLOCK_SIZE < self.attr.size:
                    self._start(i)
        parts = []
        for i in range(first, last + 1):
            block = await self._block(i)
            start = i * BLOCK_SIZE
            parts.append(block[max(offset, start) - start : end - start])
        self._trim(first)
        return b"".join(parts)

    def _start(self, index: int) -> _Block:
        block = self._blocks.get(index)
        if block is None:
            block = self._blocks[index] = _Block()
            start = index * BLOCK_SIZE
            length = min(BLOCK_SIZE, self.attr.size - start)
            self._nursery.start_soon(block.fetch, self.reader, self.path, self.attr, start, length)
        return block

    async def _block(self, index: int) -> bytes:
        block = self._start(index)
        await block.done.wait()
        if block.error is not None:
            if self._blocks.get(index) is block:  # let the next read try again
                del self._blocks[index]
            raise block.error
        return block.data

    def _trim(self, current: int) -> None:
        if len(self._blocks) > HANDLE_BLOCKS:
            for index in sorted(self._blocks, key=lambda i: (i >= current, i))[
                : len(self._blocks) - HANDLE_BLOCKS
            ]:
                if self._blocks[index].done.is_set():
                    del self._blocks[index]


class _Block:
    """One fetch shared by every read that needs the block (runs in the client's nursery)."""

    def __init__(self):
        self.done = trio.Event()
        self.data = b""
        self.error: CacheFsError | None = None

    async def fetch(self, reader: DataReader, path: str, attr: Attr, offset: int, length: int):
        try:
            self.data = await reader.read(path, attr, offset, length)
            if len(self.data) != length:
                raise CacheFsError(f"short read of {path}: {len(self.data)} of {length} bytes")
        except CacheFsError as exc:
            self.error = exc
        except Exception as exc:  # a bug: surface as EIO, keep the file system alive
            log.exception("reading %s failed", path)
            self.error = CacheFsError(f"reading {path} failed: {exc!r}")
        finally:
            self.done.set()
