"""Directory-sibling prefetch: a cold read in a directory warms the files that follow it.

Rawframes-like datasets are read as runs of frames of one directory (a clip), so the first cold
read in a directory says which files come next. The owners of those files fetch them from the
store at the cluster's concurrency, through the same single-flight fills as reads, instead of
one reader thread waiting out the store's latency file after file.

Bounded: small files only, WINDOW files past the read that started it; a later cold read in
the same directory (a file past the window) moves the window on. At most MAX_DIRS directories
are followed at once: a reader that moves on to new directories cancels the oldest one's
remaining batches (the worker finishes fills it already started).
"""

from __future__ import annotations

import bisect
import logging
import posixpath
from collections import OrderedDict, defaultdict
from collections.abc import Iterable

import trio

from cachefs.errors import CacheFsError
from cachefs.meta import BLOCK_SIZE, Attr, cache_key
from cachefs.workers import WorkerDirectory

log = logging.getLogger("cachefs.fuse.prefetch")

WINDOW = 32  # files fetched ahead of a cold read in its directory
MAX_DIRS = 32  # directories followed at once
LISTING_MAX = 100_000  # a directory larger than this is not prefetched (its listing would be)
PAGE = 1000


def next_siblings(names: list[str], current: str, requested: set[str], window: int) -> list[str]:
    """The names after `current` (sorted `names`) within `window`, not requested yet."""
    start = bisect.bisect_right(names, current)
    return [name for name in names[start : start + window] if name not in requested]


class _Directory:
    def __init__(self):
        self.scope = trio.CancelScope()
        self.cursors: list[str] = []  # cold reads not yet followed
        self.wake = trio.Event()
        self.requested: set[str] = set()


class SiblingPrefetcher:
    """Follows cold reads of one dataset's mount; runs its tasks in the client's nursery."""

    def __init__(
        self,
        dataset: str,
        master,
        workers: WorkerDirectory,
        nursery: trio.Nursery,
        *,
        window: int = WINDOW,
        max_dirs: int = MAX_DIRS,
    ):
        self.dataset = dataset
        self.master = master
        self.workers = workers
        self._nursery = nursery
        self.window = window
        self.max_dirs = max_dirs
        self._dirs: OrderedDict[str, _Directory] = OrderedDict()

    def after_cold_read(self, path: str) -> None:
        """A read of `path` had to go to the store: warm what follows it. Never blocks."""
        parent, name = posixpath.split(path)
        directory = self._dirs.get(parent)
        if directory is None:
            directory = self._dirs[parent] = _Directory()
            if len(self._dirs) > self.max_dirs:
                _, oldest = self._dirs.popitem(last=False)
                oldest.scope.cancel()
            self._nursery.start_soon(self._follow, parent, directory)
        else:
            self._dirs.move_to_end(parent)
        if name not in directory.requested:
            directory.cursors.append(name)
            directory.wake.set()

    async def _follow(self, parent: str, directory: _Directory) -> None:
        with directory.scope:
            try:
                files = await self._small_files(parent)
            except CacheFsError as exc:
                log.info("no prefetch in %s: %s", parent or "/", exc.message)
                files = {}
            names = sorted(files)
            while True:
                while not directory.cursors:
                    directory.wake = trio.Event()
                    await directory.wake.wait()
                cursor = directory.cursors.pop()
                directory.cursors.clear()  # the newest read says where the reader is
                directory.requested.add(cursor)
                wanted = next_siblings(names, cursor, directory.requested, self.window)
                directory.requested.update(wanted)
                if wanted:
                    await self._fetch(parent, [(name, files[name]) for name in wanted])
                if len(directory.requested) >= len(names):
                    break
        if self._dirs.get(parent) is directory:
            del self._dirs[parent]

    async def _small_files(self, parent: str) -> dict[str, Attr]:
        """The small files of a directory, by name, from the master."""
        attr = Attr.from_wire(
            await self.master.call("lookup_path", dataset=self.dataset, path=parent)
        )
        files: dict[str, Attr] = {}
        after = None
        while True:
            reply = await self.master.call(
                "readdir", dataset=self.dataset, ino=attr.ino, after=after, limit=PAGE
            )
            for name, wire in reply["entries"]:
                entry = Attr.from_wire(wire)
                if not entry.is_dir and 0 < entry.size <= BLOCK_SIZE:
                    files[name] = entry
            if not reply["more"] or not reply["entries"]:
                return files
            if len(files) > LISTING_MAX:
                return {}
            after = reply["entries"][-1][0]

    async def _fetch(self, parent: str, wanted: Iterable[tuple[str, Attr]]) -> None:
        """Asks each file's owner to fetch it; one prefetch call per owner, concurrently."""
        by_owner: dict[str, list[list]] = defaultdict(list)
        for name, attr in wanted:
            path = posixpath.join(parent, name)
            key = cache_key(self.dataset, path, attr.size, attr.mtime_ns, attr.etag)
            ranked = self.workers.ranked(key)
            if ranked:
                by_owner[ranked[0]].append([path, attr.size, attr.mtime_ns, attr.etag])

        async def one(worker_id: str, files: list[list]) -> None:
            try:
                client = await self.workers.client(worker_id)
                await client.call("prefetch", dataset=self.dataset, files=files)
            except (CacheFsError, KeyError) as exc:  # a hint only: the reads still work
                log.info("prefetch on %s failed: %s", worker_id, exc)

        async with trio.open_nursery() as nursery:
            for worker_id, files in by_owner.items():
                nursery.start_soon(one, worker_id, files)
