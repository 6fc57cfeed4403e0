"""One incremental sync of a dataset's namespace snapshot (mark and sweep over lmdb).

`MetadataStore.begin_sync` makes one; it writes the store's databases directly (a friend of
master/namespace.py, whose docstring has the layout), in the service's worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cachefs.master.records import (
    FIRST_INO,
    ROOT_PARENT,
    U32,
    U64,
    WRITE_BATCH,
    entry_key,
    pack,
    record_owner,
    unpack,
)
from cachefs.meta import KIND_DIR, KIND_FILE
from cachefs.ufs import RemoteEntry

if TYPE_CHECKING:
    from cachefs.master.namespace import MetadataStore

CHANGE_LOG_GENERATIONS = 50


@dataclass
class SyncReport:
    """What one sync changed, counted in files (directories are reported separately)."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    dirs_added: int = 0
    dirs_removed: int = 0
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Sync:
    """One incremental sync of a dataset: feed it the remote listing in batches, then finish.

    Mark and sweep: every entry seen is written with this sync's generation; `finish` deletes
    what still carries an older one. An unchanged entry keeps its inode; a changed size, mtime,
    etag, mode or owner makes a new version with a new inode (like a replace by rename); a
    directory whose mode or owner changed keeps its inode (its children hang off it) and is
    logged as changed. Re-syncs log what they added, changed and removed, so mounts can
    invalidate exactly that.
    """

    store: MetadataStore
    info: dict
    report: SyncReport = field(default_factory=SyncReport)
    _dirs: dict[str, int] = field(default_factory=dict)  # path -> ino, for this sync only
    _started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.generation = self.info["generation"] + 1
        self.ds_id = self.info["id"]
        self._seq = 0
        self._dirs[""] = self.info["root"]

    def apply(self, entries: list[RemoteEntry]) -> None:
        store = self.store
        with store.env.begin(write=True) as txn:
            for entry in entries:
                parent_path, _, name = entry.path.rpartition("/")
                parent = self._ensure_dir(txn, parent_path)
                if entry.is_dir:
                    self._dirs[entry.path] = self._upsert(txn, parent, name, KIND_DIR, 0, entry)
                else:
                    self._upsert(txn, parent, name, KIND_FILE, entry.size, entry)

    def _ensure_dir(self, txn, path: str) -> int:
        ino = self._dirs.get(path)
        if ino is None:
            parent_path, _, name = path.rpartition("/")
            parent = self._ensure_dir(txn, parent_path)
            ino = self._upsert(txn, parent, name, KIND_DIR, 0, None)
            self._dirs[path] = ino
        return ino

    def _upsert(self, txn, parent: int, name: str, kind: int, size: int, entry) -> int:
        store = self.store
        key = entry_key(self.ds_id, parent, name)
        raw = txn.get(key, db=store._entries)
        old = unpack(raw) if raw else None
        mtime = entry.mtime_ns if entry else (old[3] if old else 0)
        etag = entry.etag if entry else None
        # An implicit directory (no entry) keeps what a listing told before.
        owner = (entry.mode, entry.uid, entry.gid) if entry else record_owner(old or [])
        is_file = kind == KIND_FILE
        if old is not None and old[1] == kind:
            ino, version = old[0], old[4]
            same = (old[2], old[3], old[5], *record_owner(old)) == (size, mtime, etag, *owner)
            if old[6] == self.generation:  # already seen in this sync (implicit dir, then listed)
                if entry is None or same:
                    return ino
            elif not is_file and record_owner(old) != owner:
                # Permissions are part of what clients cached: make them look the entry up again.
                self._log_change(txn, parent, name, ino)
            elif not same and is_file:
                # A new version is a new inode, as if the file had been replaced by rename:
                # the kernel's page cache of the old inode stays with handles opened before;
                # a mode or owner change too, so no client keeps enforcing the old bits.
                self._log_change(txn, parent, name, ino)
                txn.delete(U64.pack(ino), db=store._inodes)
                ino, version = store._next(txn, b"next_ino", FIRST_INO), version + 1
                txn.put(U64.pack(ino), key, db=store._inodes)
                self.report.changed += 1
        else:
            if old is not None:  # kind changed: the old entry's subtree is swept by finish()
                txn.delete(U64.pack(old[0]), db=store._inodes)
                self._count_removed(old)
            ino, version = store._next(txn, b"next_ino", FIRST_INO), 1
            txn.put(U64.pack(ino), key, db=store._inodes)
            self._log_change(txn, parent, name, ino)
            if is_file:
                self.report.added += 1
            else:
                self.report.dirs_added += 1
        if old is None or old[6] != self.generation:
            if is_file:
                self.report.files += 1
                self.report.bytes += size
            else:
                self.report.dirs += 1
        record = [ino, kind, size, mtime, version, etag, self.generation]
        if owner != (None, None, None):
            record += owner
        txn.put(key, pack(record), db=store._entries)
        return ino

    def _log_change(self, txn, parent: int, name: str, ino: int) -> None:
        if self.generation == 1:  # the first sync: nothing can have been cached before it
            return
        self._seq += 1
        key = U32.pack(self.ds_id) + U64.pack(self.generation) + U32.pack(self._seq)
        txn.put(key, pack([parent, name, ino]), db=self.store._changes)

    def _count_removed(self, record: list) -> None:
        if record[1] == KIND_FILE:
            self.report.removed += 1
        else:
            self.report.dirs_removed += 1

    def finish(self) -> SyncReport:
        """Sweeps entries this sync did not see and records the new generation and counters."""
        store = self.store
        prefix = U32.pack(self.ds_id)
        root_key = entry_key(self.ds_id, ROOT_PARENT, "")
        position = prefix
        while position is not None:
            with store.env.begin(write=True) as txn:
                cursor = txn.cursor(store._entries)
                position = self._sweep_some(txn, cursor, position, prefix, root_key)
        self._prune_changes()
        info = dict(self.info)
        info.update(
            generation=self.generation,
            changes_from=max(1, self.generation - CHANGE_LOG_GENERATIONS + 1),
            files=self.report.files,
            dirs=self.report.dirs,
            bytes=self.report.bytes,
        )
        self.report.seconds = round(time.monotonic() - self._started, 3)
        info["last_sync"] = {"at": time.time(), **self.report.as_dict()}
        store._save_dataset(info)
        return self.report

    def _prune_changes(self) -> None:
        """Keeps the change log of the last CHANGE_LOG_GENERATIONS syncs."""
        prefix = U32.pack(self.ds_id)
        end = prefix + U64.pack(max(0, self.generation - CHANGE_LOG_GENERATIONS + 1))
        with self.store.env.begin(write=True) as txn:
            cursor = txn.cursor(self.store._changes)
            if cursor.set_range(prefix):
                while cursor.key() and cursor.key() < end:
                    cursor.delete()

    def _sweep_some(self, txn, cursor, position: bytes, prefix: bytes, root_key: bytes):
        """Deletes stale entries from `position` on; returns where to resume, None when done."""
        if not cursor.set_range(position):
            return None
        visited = 0
        while True:
            key = cursor.key()
            if not key.startswith(prefix):
                return None
            if visited == WRITE_BATCH:
                return key
            visited += 1
            record = unpack(cursor.value())
            if record[6] != self.generation and key != root_key:
                txn.delete(U64.pack(record[0]), db=self.store._inodes)
                self._count_removed(record)
                self._log_change(txn, U64.unpack(key[4:12])[0], key[12:].decode(), record[0])
                if not cursor.delete():
                    return None
            elif not cursor.next():
                return None
