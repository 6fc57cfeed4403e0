"""The master's persistent state in lmdb: datasets and each dataset's namespace snapshot.

Everything lives in lmdb rather than Python dicts, so a dataset of millions of files costs the
master page cache, not heap, and a restarted master finds the same inode ids.

Sub-databases and their keys (integers big-endian, so lmdb's byte order is numeric order):

    datasets  name (utf-8)                   -> msgpack dict (id, uri, options, root, counters)
    entries   ds_id u32 | parent u64 | name  -> msgpack [ino, kind, size, mtime, version, etag, gen,
              mode, uid, gid] (the last three: file:// only, absent in records of older versions)
    inodes    ino u64                        -> ds_id u32 | parent u64 | name
    meta      next_ino, next_ds, epoch       -> u64
    jobs      job id u64                     -> msgpack dict (see master/jobs.py)
    changes   ds_id u32 | generation u64 | seq u32 -> msgpack [parent, name, ino]: what a
              re-sync added, changed or removed, so mounts can invalidate exactly that

`entries` keyed by parent makes lookup a single get and readdir a prefix scan in name order, so
a listing can be paged by "names after X". The dataset root is the entry (ds_id, 0, "").

Every method here is synchronous and short, except `Sync.apply` and `remove_dataset`, which the
service runs in a worker thread. lmdb allows one writer and many concurrent readers.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb

from cachefs.errors import AlreadyExists, InvalidArgument, NotADirectory, NotFound
from cachefs.master.records import (
    FIRST_INO,
    ROOT_PARENT,
    U32,
    U64,
    WRITE_BATCH,
    entry_key,
    pack,
    record_attr,
    unpack,
)
from cachefs.master.sync import Sync
from cachefs.meta import KIND_DIR, Attr
from cachefs.runtime import open_private, private_dir, private_lmdb


def restore_backup(backup: str | Path, state_dir: str | Path) -> None:
    """Seeds a new state directory from a backup file written by `MetadataStore.backup`."""
    target = Path(state_dir) / "meta.lmdb"
    if target.exists():
        raise AlreadyExists(f"{state_dir} already holds master state; restore into a new one")
    private_dir(target)
    shutil.copyfile(backup, target / "data.mdb")
    os.chmod(target / "data.mdb", 0o600)
    env = lmdb.open(private_lmdb(target), readonly=True, max_dbs=8, mode=0o600)
    with env, env.begin() as txn:
        if txn.get(b"datasets") is None:  # not a cachefs master store
            shutil.rmtree(target)
            raise InvalidArgument(f"{backup} is not a cachefs master backup")


class MetadataStore:
    def __init__(self, path: str | Path, *, map_size: int = 1 << 36):
        path = private_dir(Path(path))  # it holds dataset credentials: 0700, files 0600
        # map_size is address space, not memory: lmdb grows the file as data arrives.
        self.env = lmdb.open(
            private_lmdb(path / "meta.lmdb"), map_size=map_size, max_dbs=8, readahead=False,
            metasync=False, mode=0o600,
        )  # fmt: skip
        self._datasets = self.env.open_db(b"datasets")
        self._entries = self.env.open_db(b"entries")
        self._inodes = self.env.open_db(b"inodes")
        self._meta = self.env.open_db(b"meta")
        self._jobs = self.env.open_db(b"jobs")
        self._changes = self.env.open_db(b"changes")
        self._by_name: dict[str, dict] = {}
        with self.env.begin() as txn:
            for name, raw in txn.cursor(self._datasets):
                self._by_name[name.decode()] = unpack(raw)

    def close(self) -> None:
        self.env.close()

    def backup(self, path: str) -> int:
        """A consistent, compacted copy of the whole store to one file (safe while serving)."""
        tmp = f"{path}.partial"
        fd = open_private(Path(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self.env.copyfd(fd, compact=True)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # never a half-written backup under the final name
        return os.path.getsize(path)

    # ---- counters -------------------------------------------------------------------------

    def _next(self, txn, key: bytes, start: int) -> int:
        raw = txn.get(key, db=self._meta)
        value = U64.unpack(raw)[0] if raw else start
        txn.put(key, U64.pack(value + 1), db=self._meta)
        return value

    def get_meta(self, key: str) -> object | None:
        with self.env.begin() as txn:
            raw = txn.get(f"doc:{key}".encode(), db=self._meta)
        return unpack(raw) if raw is not None else None

    def set_meta(self, key: str, value: object) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(f"doc:{key}".encode(), pack(value), db=self._meta)

    def bump_epoch(self) -> int:
        """A membership epoch that keeps growing across master restarts."""
        with self.env.begin(write=True) as txn:
            return self._next(txn, b"epoch", 1) + 1

    # ---- datasets -------------------------------------------------------------------------

    def dataset(self, name: str) -> dict:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(f"unknown dataset {name!r}") from None

    def datasets(self) -> list[dict]:
        return [self._by_name[name] for name in sorted(self._by_name)]

    def check_new_name(self, name: str) -> None:
        if name in self._by_name:
            raise AlreadyExists(f"dataset {name!r} already exists ({self._by_name[name]['uri']})")
        if not name or "/" in name or name.startswith(".") or len(name) > 200:
            raise InvalidArgument(f"invalid dataset name {name!r}")

    def add_dataset(self, name: str, uri: str, options: dict[str, str]) -> dict:
        self.check_new_name(name)
        with self.env.begin(write=True) as txn:
            ds_id = self._next(txn, b"next_ds", 1)
            root = self._next(txn, b"next_ino", FIRST_INO)
            now = time.time_ns()
            txn.put(
                entry_key(ds_id, ROOT_PARENT, ""),
                pack([root, KIND_DIR, 0, now, 1, None, 0]),
                db=self._entries,
            )
            txn.put(U64.pack(root), entry_key(ds_id, ROOT_PARENT, ""), db=self._inodes)
            info = {
                "name": name,
                "id": ds_id,
                "uri": uri,
                "options": dict(options),
                "root": root,
                "created": now,
                "generation": 0,
                "last_sync": None,
                "files": 0,
                "dirs": 0,
                "bytes": 0,
            }
            txn.put(name.encode(), pack(info), db=self._datasets)
        self._by_name[name] = info
        return info

    def _save_dataset(self, info: dict) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(info["name"].encode(), pack(info), db=self._datasets)
        self._by_name[info["name"]] = info

    def remove_dataset(self, name: str) -> None:
        """Drops the dataset and its whole namespace, in bounded write transactions."""
        info = self.dataset(name)
        with self.env.begin(write=True) as txn:
            txn.delete(name.encode(), db=self._datasets)
        del self._by_name[name]
        prefix = U32.pack(info["id"])
        while True:
            with self.env.begin(write=True) as txn:
                cursor = txn.cursor(self._entries)
                deleted = 0
                if cursor.set_range(prefix):
                    while cursor.key().startswith(prefix) and deleted < WRITE_BATCH:
                        ino = unpack(cursor.value())[0]
                        txn.delete(U64.pack(ino), db=self._inodes)
                        cursor.delete()  # moves to the next record
                        deleted += 1
            if deleted < WRITE_BATCH:
                return

    # ---- namespace reads ------------------------------------------------------------------

    def root(self, dataset: str) -> Attr:
        return self.getattr(dataset, self.dataset(dataset)["root"])

    def lookup(self, dataset: str, parent: int, name: str) -> Attr:
        ds_id = self.dataset(dataset)["id"]
        with self.env.begin() as txn:
            return self._lookup(txn, ds_id, parent, name)

    def lookup_many(self, dataset: str, items: Iterable[tuple[int, str]]) -> list[Attr | None]:
        ds_id = self.dataset(dataset)["id"]
        out: list[Attr | None] = []
        with self.env.begin() as txn:
            for parent, name in items:
                raw = txn.get(entry_key(ds_id, parent, name), db=self._entries)
                out.append(record_attr(unpack(raw)) if raw else None)
        return out

    def _lookup(self, txn, ds_id: int, parent: int, name: str) -> Attr:
        raw = txn.get(entry_key(ds_id, parent, name), db=self._entries)
        if raw is None:
            parent_key = txn.get(U64.pack(parent), db=self._inodes)
            if parent_key is None or U32.unpack(parent_key[:4])[0] != ds_id:
                raise NotFound(f"no directory with inode {parent}")
            if unpack(txn.get(parent_key, db=self._entries))[1] != KIND_DIR:
                raise NotADirectory(f"inode {parent} is not a directory")
            raise NotFound(f"{name!r} not found")
        return record_attr(unpack(raw))

    def lookup_path(self, dataset: str, path: str) -> Attr:
        info = self.dataset(dataset)
        with self.env.begin() as txn:
            attr = self._attr_of(txn, info["root"])
            for name in (part for part in path.split("/") if part):
                if not attr.is_dir:
                    raise NotADirectory(f"{path!r}: a component is not a directory")
                attr = self._lookup(txn, info["id"], attr.ino, name)
            return attr

    def _attr_of(self, txn, ino: int) -> Attr:
        key = txn.get(U64.pack(ino), db=self._inodes)
        if key is None:
            raise NotFound(f"no inode {ino}")
        return record_attr(unpack(txn.get(key, db=self._entries)))

    def getattr(self, dataset: str, ino: int) -> Attr:
        ds_id = self.dataset(dataset)["id"]
        with self.env.begin() as txn:
            key = txn.get(U64.pack(ino), db=self._inodes)
            if key is None or U32.unpack(key[:4])[0] != ds_id:
                raise NotFound(f"no inode {ino} in dataset {dataset!r}")
            return record_attr(unpack(txn.get(key, db=self._entries)))

    def path_of(self, dataset: str, ino: int) -> str:
        """The path of an inode relative to the dataset root (walks up the parents)."""
        ds_id = self.dataset(dataset)["id"]
        names = []
        with self.env.begin() as txn:
            while True:
                key = txn.get(U64.pack(ino), db=self._inodes)
                if key is None or U32.unpack(key[:4])[0] != ds_id:
                    raise NotFound(f"no inode {ino} in dataset {dataset!r}")
                ino = U64.unpack(key[4:12])[0]
                if ino == ROOT_PARENT:
                    return "/".join(reversed(names))
                names.append(key[12:].decode())

    def readdir(
        self, dataset: str, ino: int, after: str | None = None, limit: int = 1000
    ) -> tuple[list[tuple[str, Attr]], bool]:
        """Up to `limit` (name, attr) pairs in name order after `after`; and whether more remain."""
        ds_id = self.dataset(dataset)["id"]
        with self.env.begin() as txn:
            attr = self._attr_of(txn, ino)
            if not attr.is_dir:
                raise NotADirectory(f"inode {ino} is not a directory")
            prefix = U32.pack(ds_id) + U64.pack(ino)
            start = prefix + after.encode() + b"\0" if after is not None else prefix
            out: list[tuple[str, Attr]] = []
            cursor = txn.cursor(self._entries)
            if not cursor.set_range(start):
                return out, False
            for key, raw in cursor:
                if not key.startswith(prefix):
                    return out, False
                if len(out) == limit:
                    return out, True
                out.append((key[len(prefix) :].decode(), record_attr(unpack(raw))))
            return out, False

    def iter_files(
        self, dataset: str, base: str = "", ino: int | None = None
    ) -> Iterator[tuple[str, Attr]]:
        """Every file below directory `base` (inode `ino`) with its path, depth-first."""
        stack = [(base, ino if ino is not None else self.dataset(dataset)["root"])]
        while stack:
            base, ino = stack.pop()
            after = None
            while True:
                page, more = self.readdir(dataset, ino, after, 1000)
                for name, attr in page:
                    path = f"{base}/{name}" if base else name
                    if attr.is_dir:
                        stack.append((path, attr.ino))
                    else:
                        yield path, attr
                if not more:
                    break
                after = page[-1][0]

    # ---- change log ---------------------------------------------------------------------

    def changes_since(self, dataset: str, generation: int, limit: int = 100_000) -> dict:
        """Entries added, changed or removed by the syncs after `generation`.

        `complete` is False when the log no longer reaches back that far (or holds more than
        `limit`): the caller must then drop everything it cached.
        """
        info = self.dataset(dataset)
        current = info["generation"]
        oldest = info.get("changes_from", 1)
        out: list = []
        complete = generation + 1 >= oldest
        prefix = U32.pack(info["id"])
        with self.env.begin() as txn:
            cursor = txn.cursor(self._changes)
            if complete and cursor.set_range(prefix + U64.pack(generation + 1)):
                for key, raw in cursor:
                    if not key.startswith(prefix):
                        break
                    if len(out) == limit:
                        complete = False
                        break
                    out.append(unpack(raw))
        return {"generation": current, "changes": out if complete else [], "complete": complete}

    # ---- load jobs ------------------------------------------------------------------------

    def put_job(self, job: dict) -> dict:
        """Stores a job; a job without an id gets the next one."""
        with self.env.begin(write=True) as txn:
            if "id" not in job:
                job["id"] = self._next(txn, b"next_job", 1)
            txn.put(U64.pack(job["id"]), pack(job), db=self._jobs)
        return job

    def job(self, job_id: int) -> dict:
        with self.env.begin() as txn:
            raw = txn.get(U64.pack(job_id), db=self._jobs)
        if raw is None:
            raise NotFound(f"no job {job_id}")
        return unpack(raw)

    def jobs(self) -> list[dict]:
        with self.env.begin() as txn:
            return [unpack(raw) for _, raw in txn.cursor(self._jobs)]

    # ---- sync -----------------------------------------------------------------------------

    def begin_sync(self, dataset: str) -> Sync:
        return Sync(self, self.dataset(dataset))
