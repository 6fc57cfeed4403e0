"""Short-circuit reads: a client on a worker's host reads cached bytes from the worker's files.

The worker's lmdb index says where a key lives (tier, slot, length, xxh3_64); the bytes are read
straight from the tier file, verified against the checksum and returned as a copy. Anything
else — no entry, a slot reused by eviction after the lookup, a torn or corrupt slot, a file that
does not open — is a miss and the caller uses the RPC, which also fills. Never wrong bytes: the
checksum is taken over the copy that is returned.

Rules that keep the worker safe from its readers:
- the index is opened read-only (lmdb allows readers in other processes); reads are short
  transactions, so they never pin old pages for long;
- tier files are read with pread, not mmap: a restarting worker truncates and re-allocates a
  tier whose geometry changed, and touching a truncated mapping kills the reader with SIGBUS,
  while pread just comes back short (a miss);
- only files owned by this process's user and private to it (0600, as the worker makes them)
  are opened, so a path in a token can never make a client read someone else's file;
- an lmdb environment is opened once per process (a second open in one process breaks lmdb's
  locks), so handles live in a process-wide pool, counted by their users.

`CACHEFS_SHORTCIRCUIT=0` turns it off (for comparisons and as an escape hatch).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

import lmdb
import msgpack
import trio

from cachefs.meta import checksum
from cachefs.worker.index import ENTRIES_DB, META_DB, OPEN_INDEXES, extent_of, geometry_key

log = logging.getLogger("cachefs.shortcircuit")

SWITCH = "CACHEFS_SHORTCIRCUIT"
#: MEM reads up to this size are memory copies: done inline, cheaper than a thread hop.
INLINE_MAX = 1 << 20
RETRY_OPEN = 10.0  # seconds before a worker whose files did not open is tried again
#: Keys remembered per worker between flushes of the `touched` hints; extras are dropped
#: (a hint, not an account): the worker's RPC takes at most this many per call.
TOUCHED_MAX = 10_000


def enabled_by_env() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Located:
    tier: str
    offset: int
    length: int
    checksum: int


def _check_private(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private file of this user")


class _Files:
    """One worker's index and tier files, open read-only; shared by threads and readers."""

    def __init__(self, token: dict):
        self.token = token
        self.users = 0
        self.retired = False
        self.fds: dict[str, int] = {}
        self.ids: dict[str, tuple[int, int]] = {}  # path -> (dev, ino) as opened
        self._geometry: dict[str, bytes] = {}  # tier -> the layout its entries were read under
        index = str(token["index"])
        data = os.path.join(index, "data.mdb")
        self.env = None
        try:
            st = os.stat(data, follow_symlinks=False)
            _check_private(st, data)
            self.ids[data] = (st.st_dev, st.st_ino)
            self.env = lmdb.open(
                index, readonly=True, lock=True, create=False, max_dbs=4, readahead=False
            )
            self.entries = self.env.open_db(ENTRIES_DB, create=False)
            self.meta = self.env.open_db(META_DB, create=False)
            for tier, path in token["tiers"].items():
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self.fds[tier] = fd
                st = os.fstat(fd)
                _check_private(st, path)
                self.ids[path] = (st.st_dev, st.st_ino)
        except BaseException:
            self.close()
            raise

    def changed(self) -> bool:
        """Whether a file was replaced since it was opened (a new worker state or tier file)."""
        for path, ident in self.ids.items():
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                return True
            if (st.st_dev, st.st_ino) != ident:
                return True
        return False

    def lookup(self, key: bytes) -> Located | None:
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.entries)
            if raw is None:
                return None
            tier, start, pages, length, digest, _ = msgpack.unpackb(raw)
            # Read with the entry, in one transaction: a worker restarted with another layout
            # rewrites both, and an entry is only trusted under the layout it was written in.
            geo_raw = txn.get(geometry_key(tier).encode(), db=self.meta)
            if geo_raw is None or tier not in self.fds:
                return None
            if self._geometry.get(tier) != geo_raw:
                if msgpack.unpackb(geo_raw)[0] != "extents":
                    return None
                self._geometry[tier] = bytes(geo_raw)
        slot = extent_of(start, pages)
        if length > slot.capacity:
            return None
        return Located(tier, slot.offset, length, digest)

    def fetch(self, loc: Located) -> bytes | None:
        """The slot's bytes if they still carry the entry's checksum, else None."""
        data = os.pread(self.fds[loc.tier], loc.length, loc.offset)
        if len(data) != loc.length or checksum(data) != loc.checksum:
            return None
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.env is not None:
            self.env.close()
            self.env = None


class _Pool:
    """Process-wide: one `_Files` per index dir, closed when its last user lets go."""

    def __init__(self):
        self.lock = threading.Lock()
        self.files: dict[str, _Files] = {}

    def acquire(self, token: dict) -> _Files:
        index = str(token["index"])
        with self.lock:
            if os.path.realpath(index) in OPEN_INDEXES:
                # This process runs the worker itself (embedded): a second lmdb open here
                # would break lmdb's locks, and the in-process call is cheap anyway.
                raise PermissionError(f"{index} is this process's own worker index")
            files = self.files.get(index)
            if files is None or files.token != token or files.retired:
                if files is not None:
                    self._retire(files)
                files = self.files[index] = _Files(token)
            files.users += 1
            return files

    def release(self, files: _Files) -> None:
        with self.lock:
            files.users -= 1
            if files.users == 0:  # its last reader let go (unmount, or it was retired)
                self._retire(files)

    def retire(self, files: _Files) -> None:
        """Stops handing `files` out; closed once no read uses it any more."""
        with self.lock:
            self._retire(files)

    def _retire(self, files: _Files) -> None:
        if not files.retired:
            files.retired = True
            if self.files.get(str(files.token["index"])) is files:
                del self.files[str(files.token["index"])]
            if files.users == 0:
                files.close()


_POOL = _Pool()


class ShortCircuit:
    """Reads of local workers' cached objects; owned by a `WorkerDirectory`, closed with it.

    `hits` / `misses` (no entry) / `fallbacks` (an entry whose bytes did not verify, or files
    that failed) count outcomes; every miss and fallback is served by the RPC instead.
    """

    def __init__(self, *, enabled: bool | None = None):
        self.enabled = enabled_by_env() if enabled is None else enabled
        self.hits = 0
        self.hit_bytes = 0
        self.misses = 0
        self.fallbacks = 0
        self._lock = threading.Lock()
        self._held: dict[str, _Files] = {}  # worker id -> files this reader holds
        self._failed: dict[str, tuple[dict, float]] = {}  # worker id -> (token, retry after)
        self._limiter = trio.CapacityLimiter(8)
        # worker id -> (dataset -> hit bytes, keys served) since the last flush: the worker
        # never sees these reads, so they are sent to it as LRU touches and served bytes.
        self._touched: dict[str, tuple[dict[str, int], set[bytes]]] = {}

    def counters(self) -> dict:
        return {
            "hits": self.hits, "hit_bytes": self.hit_bytes, "misses": self.misses,
            "fallbacks": self.fallbacks,
        }  # fmt: skip

    # ---- handles -------------------------------------------------------------------------

    def _acquire(self, worker_id: str, token: dict) -> _Files | None:
        with self._lock:
            files = self._held.get(worker_id)
            if files is not None and files.token == token and not files.retired:
                with _POOL.lock:
                    files.users += 1
                return files
            failed = self._failed.get(worker_id)
            if failed is not None and failed[0] == token and time.monotonic() < failed[1]:
                return None
            try:
                new = _POOL.acquire(token)
            except (OSError, lmdb.Error, KeyError, TypeError) as exc:
                self._failed[worker_id] = (token, time.monotonic() + RETRY_OPEN)
                log.info("no short-circuit reads from worker %s: %s", worker_id, exc)
                return None
            self._failed.pop(worker_id, None)
            if files is not None:
                self._drop_held(worker_id)
            self._held[worker_id] = new
            with _POOL.lock:
                new.users += 1  # one for the table, one for this read
            return new

    def _drop_held(self, worker_id: str) -> None:
        files = self._held.pop(worker_id, None)
        if files is not None:
            _POOL.release(files)

    def refresh(self, tokens: dict[str, dict]) -> None:
        """Lets go of workers that left or changed, and of files replaced on disk."""
        with self._lock:
            for worker_id, files in list(self._held.items()):
                replaced = files.changed()
                if replaced:
                    _POOL.retire(files)
                if replaced or tokens.get(worker_id) != files.token:
                    self._drop_held(worker_id)
            for worker_id in [w for w in self._touched if w not in tokens]:
                del self._touched[worker_id]  # departed: nobody to tell

    def close(self) -> None:
        with self._lock:
            for worker_id in list(self._held):
                self._drop_held(worker_id)
        if self.hits or self.fallbacks:
            log.info("short-circuit reads: %s", self.counters())

    # ---- hints for the worker ------------------------------------------------------------

    def note_served(self, worker_id: str, dataset: str, keys: list[bytes], nbytes: int) -> None:
        """Records a read served from `worker_id`'s files, for the next `take_touched`."""
        with self._lock:
            bytes_by_dataset, touched = self._touched.setdefault(worker_id, ({}, set()))
            bytes_by_dataset[dataset] = bytes_by_dataset.get(dataset, 0) + nbytes
            for key in keys:
                if len(touched) >= TOUCHED_MAX:
                    break
                touched.add(key)

    def take_touched(self) -> dict[str, tuple[dict[str, int], list[bytes]]]:
        """What was served per worker since the last call: (dataset -> bytes, keys)."""
        with self._lock:
            taken, self._touched = self._touched, {}
        return {w: (by_dataset, list(keys)) for w, (by_dataset, keys) in taken.items()}

    # ---- reads ---------------------------------------------------------------------------

    def read_sync(
        self, worker_id: str, token: dict, key: bytes, *, memory_only: bool = False
    ) -> bytes | None:
        """The verified bytes of `key` from a local worker's files, or None: use the RPC.

        `memory_only`: only a RAM-tier object of at most INLINE_MAX bytes (no disk I/O, so an
        event loop may call this inline); anything else, or a failed check, is None and not
        counted.
        """
        files = self._acquire(worker_id, token)
        if files is None:
            return None
        try:
            loc = files.lookup(key)
            if memory_only:
                if loc is None or loc.tier != "mem" or loc.length > INLINE_MAX:
                    return None
                data = files.fetch(loc)
                # A failed check is not counted here: the caller's full path tries again and
                # counts it (and then reads through the worker).
                return None if data is None else self._count(files, loc, data)
            return self._count(files, loc, files.fetch(loc) if loc is not None else None)
        except (OSError, lmdb.Error, ValueError, TypeError, LookupError) as exc:
            return self._failure(worker_id, files, exc)
        finally:
            _POOL.release(files)

    async def read(self, worker_id: str, token: dict, key: bytes) -> bytes | None:
        """As `read_sync`; large or DISK reads run in a thread so the event loop keeps going."""
        files = self._acquire(worker_id, token)
        if files is None:
            return None
        try:
            loc = files.lookup(key)
            if loc is None:
                data = None
            elif loc.tier == "mem" and loc.length <= INLINE_MAX:
                data = files.fetch(loc)
            else:
                data = await trio.to_thread.run_sync(files.fetch, loc, limiter=self._limiter)
            return self._count(files, loc, data)
        except (OSError, lmdb.Error, ValueError, TypeError, LookupError) as exc:
            return self._failure(worker_id, files, exc)
        finally:
            _POOL.release(files)

    def _count(self, files: _Files, loc: Located | None, data: bytes | None) -> bytes | None:
        with self._lock:
            if loc is None:
                self.misses += 1
            elif data is None:  # reused by eviction, torn, corrupt, or the file was replaced
                self.fallbacks += 1
            else:
                self.hits += 1
                self.hit_bytes += len(data)
        if loc is not None and data is None and files.changed():
            _POOL.retire(files)  # reopened by the next read
        return data

    def _failure(self, worker_id: str, files: _Files, exc: Exception) -> None:
        log.info("short-circuit read from worker %s failed (%s); using the RPC", worker_id, exc)
        with self._lock:
            self.fallbacks += 1
            # Reopened after a pause, not on every read: a broken file would fail again.
            self._failed[worker_id] = (files.token, time.monotonic() + RETRY_OPEN)
            if self._held.get(worker_id) is files:
                self._drop_held(worker_id)
        _POOL.retire(files)
        return None
