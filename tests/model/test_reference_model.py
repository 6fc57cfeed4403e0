"""Reference model: remote changes, syncs and client reads against a plain dict.

Hypothesis draws a list of operations; each example runs them in one `trio.run` against real
parts: a master (`run_master`, lmdb in a temp dir), a worker (`run_worker`, a 16 MiB MEM tier in
a temp dir) and a `Vfs` wired as `serve_mount` wires it (RPC to the master, a `WorkerDirectory`,
a `DataReader` with a direct fallback), minus pyfuse3: the test calls the Vfs methods itself.
The remote store is a local directory (file://).

The model is a dict path -> version (unique id, bytes, mtime) plus the set of directories. The
client sees the *snapshot* taken by the last sync; remote changes stay invisible until the next
one. After every step the client must agree with the model:

- lookups and readdirs show exactly the snapshot (kinds, sizes, mtimes; errno ENOENT/ENOTDIR);
- inode numbers: an unchanged file or a directory keeps its inode across syncs, a new version
  gets an inode never used before;
- after a sync: the report's counts, statfs, every path's attributes, every directory listing,
  and `poll_changes` names every (parent inode, name) whose entry changed;
- a read returns exactly the bytes of the version the handle was opened on (the snapshot at
  open time). Only when the remote no longer holds that version may it fail instead, with a
  `CacheFsError`; it must never return other bytes, and never a mix of versions. A read of an
  unchanged file never fails and never bypasses the worker.

`test_stale_versions_are_never_served` keeps the cases of a bug this model found (fills that
checked only the length read, not the version) as regression tests.
CACHEFS_MODEL_EXAMPLES=N runs N examples instead of 50.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from cachefs.errors import CacheFsError
from cachefs.fuse import vfs as vfs_module
from cachefs.fuse.metacache import MetaCache
from cachefs.fuse.reader import BLOCK_SIZE, DataReader
from cachefs.fuse.vfs import Vfs
from cachefs.master import sync as master_sync
from cachefs.master.service import run_master
from cachefs.meta import KIND_DIR, KIND_FILE, Attr
from cachefs.rpc import RpcClient
from cachefs.ufs import RemoteStore
from cachefs.worker.service import run_worker
from cachefs.worker.store import BlockStore
from cachefs.workers import WorkerDirectory

MiB = 1 << 20
DATASET = "model"
MTIME_BASE_NS = 1_700_000_000 * 10**9  # every put gets its own second after this
STEP_TIMEOUT = 60.0  # a hung step fails the example instead of hanging the suite

# A small name space with nesting and kind changes: "a" and "a/c" are directories most of the
# time, but a put may turn them into files (and a put below them back into directories).
FILE_PATHS = ["f", "a/f", "a/g", "a/c/f", "a/c/g", "b/f", "b/g"]
CONFLICT_PATHS = ["a", "a/c"]
DIR_PATHS = ["a", "a/c", "b"]
PROBE_PATHS = FILE_PATHS + DIR_PATHS + ["nope", "a/nope", "f/x", "a/c/f/x"]
LISTED_PATHS = ["", *DIR_PATHS, "f", "nope"]
MAX_HELD = 3
MAX_SIZE = 6 * MiB  # files above BLOCK_SIZE are read in 4 MiB blocks
# Small enough that the tests reach them: readdir pages of 2 entries (paged by "names after X")
# and a change log of 2 syncs (a client that polls later must drop everything it holds).
READDIR_PAGE = 2
CHANGE_LOG_GENERATIONS = 2


# --- operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    """Writes a new version of a file in the remote store (creating or overwriting it)."""

    path: str
    size: int


@dataclass(frozen=True)
class Delete:
    """Removes a file or a whole directory from the remote store (no-op if absent)."""

    path: str


@dataclass(frozen=True)
class Sync:
    """`dataset sync`, `times` in a row; with `poll`, the client then applies the change log."""

    poll: bool = True
    times: int = 1


@dataclass(frozen=True)
class Lookup:
    path: str


@dataclass(frozen=True)
class Readdir:
    path: str


@dataclass(frozen=True)
class Read:
    """open, one read, release."""

    path: str | int  # an int: see `file_paths`
    offset: int
    size: int


@dataclass(frozen=True)
class ReadAll:
    """open, sequential reads of `chunk` bytes up to EOF, release."""

    path: str | int  # an int: see `file_paths`
    chunk: int


@dataclass(frozen=True)
class ReadConcurrent:
    """`n` handles of one file, each reading the whole file at the same time."""

    path: str | int  # an int: see `file_paths`
    n: int


@dataclass(frozen=True)
class Open:
    """Opens a handle and keeps it across later steps."""

    path: str | int  # an int: see `file_paths`


@dataclass(frozen=True)
class ReadHeld:
    slot: int
    offset: int
    size: int


@dataclass(frozen=True)
class Close:
    slot: int


@dataclass(frozen=True)
class Forget:
    """The kernel forgets every inode it looked up (open handles stay open)."""


sizes = st.one_of(
    st.integers(0, 3000),
    st.sampled_from([0, 1, 4095, 4096, 65537, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1]),
    st.integers(BLOCK_SIZE + 1, MAX_SIZE),
)
offsets = st.one_of(
    st.just(0),
    st.integers(0, 4000),
    st.sampled_from([BLOCK_SIZE - 3, BLOCK_SIZE, BLOCK_SIZE + 5]),
    st.integers(0, 7 * MiB),
)
lengths = st.one_of(
    st.integers(0, 5000), st.sampled_from([128 << 10, 1 * MiB, BLOCK_SIZE, 8 * MiB])
)
put_paths = st.one_of(st.sampled_from(FILE_PATHS), st.sampled_from(CONFLICT_PATHS))
puts = st.builds(Put, put_paths, sizes)
probe_paths = st.sampled_from(PROBE_PATHS)
# An int picks the n-th file of the snapshot (modulo their number), so reads mostly hit files.
file_paths = st.one_of(st.integers(0, 7), st.integers(0, 7), probe_paths)
slots = st.integers(0, MAX_HELD - 1)

operations = st.one_of(
    puts,
    puts,
    st.builds(Delete, st.sampled_from(FILE_PATHS + DIR_PATHS)),
    st.builds(Sync, st.booleans(), st.integers(1, CHANGE_LOG_GENERATIONS + 1)),
    st.builds(Sync),
    st.builds(Lookup, probe_paths),
    st.builds(Readdir, st.sampled_from(LISTED_PATHS)),
    st.builds(Read, file_paths, offsets, lengths),
    st.builds(Read, file_paths, offsets, lengths),
    st.builds(ReadAll, file_paths, st.sampled_from([4096, 128 << 10, 1 * MiB, 3 * MiB])),
    st.builds(ReadConcurrent, file_paths, st.integers(2, 4)),
    st.builds(Open, file_paths),
    st.builds(Open, file_paths),
    st.builds(ReadHeld, slots, offsets, lengths),
    st.builds(ReadHeld, slots, offsets, lengths),
    st.builds(Close, slots),
    st.just(Forget()),
)

# ~20 operations on average (one list averages ~5), yet a failure still shrinks to a few.
op_lists = st.builds(
    lambda *parts: [op for part in parts for op in part],
    *[st.lists(operations, max_size=12)] * 4,
)


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # versions are unique: identity is equality
class Version:
    vid: int
    size: int
    mtime_ns: int

    @property
    def data(self) -> bytes:
        """Made again on each use (a few ms for 6 MiB), so the history costs no memory."""
        return content(self.vid, self.size)

    def __repr__(self) -> str:
        return f"v{self.vid}({self.size} B)"


@dataclass
class Tree:
    files: dict[str, Version] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)  # without the root ""

    def copy(self) -> Tree:
        return Tree(dict(self.files), set(self.dirs))

    def kind(self, path: str) -> int | None:
        if path == "" or path in self.dirs:
            return KIND_DIR
        return KIND_FILE if path in self.files else None

    def children(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        names = {
            p[len(prefix) :]
            for p in [*self.files, *self.dirs]
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        }
        return sorted(names)

    def state(self, path: str):
        """What a client could have cached about `path` (versions are unique)."""
        if path in self.files:
            return ("file", self.files[path].vid)
        return ("dir",) if path in self.dirs else None

    def paths(self) -> list[str]:
        return sorted([*self.files, *self.dirs])

    def expected_error(self, path: str) -> int:
        """The errno of looking up a path the tree does not have."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.files:
                return errno.ENOTDIR
        return errno.ENOENT


_NOISE = random.Random(0).randbytes(MAX_SIZE)


@functools.lru_cache(maxsize=8)
def content(vid: int, size: int) -> bytes:
    """Bytes of version `vid`: random-looking, and different from every other version (of
    fewer than 256) at every offset, so even one byte tells versions apart."""
    shift = bytes((b + vid) % 256 for b in range(256))
    return _NOISE[:size].translate(shift)


class Remote:
    """The remote store: a real directory, mirrored by a Tree (the model's truth)."""

    def __init__(self, root: Path):
        self.root = root
        self.tree = Tree()
        self.history: dict[str, list[Version]] = {}
        self._vids = 0

    def put(self, path: str, size: int) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):  # a file where a parent directory must be
            ancestor = "/".join(parts[:i])
            if ancestor in self.tree.files:
                self._remove(ancestor)
            self.tree.dirs.add(ancestor)
        if path in self.tree.dirs:  # a directory where the file must be
            self._remove(path)
        self._vids += 1
        mtime_ns = MTIME_BASE_NS + self._vids * 10**9
        version = Version(self._vids, size, mtime_ns)
        full = self.root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        with open(full, "wb") as f:  # in place: truncate and rewrite, same remote inode
            f.write(version.data)
        os.utime(full, ns=(mtime_ns, mtime_ns))
        self.tree.files[path] = version
        self.history.setdefault(path, []).append(version)

    def delete(self, path: str) -> None:
        if self.tree.kind(path) is not None:
            self._remove(path)

    def _remove(self, path: str) -> None:
        full = self.root / path
        if path in self.tree.dirs:
            shutil.rmtree(full)
            below = f"{path}/"
            self.tree.dirs = {d for d in self.tree.dirs if d != path and not d.startswith(below)}
            self.tree.files = {p: v for p, v in self.tree.files.items() if not p.startswith(below)}
        else:
            full.unlink()
            del self.tree.files[path]

    def check_disk(self) -> None:
        """The directory on disk is what the model says (guards the model itself)."""
        files, dirs = {}, set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel
            dirs.update(f"{rel}/{d}" if rel else d for d in dirnames)
            for name in filenames:
                files[f"{rel}/{name}" if rel else name] = (self.root / rel / name).read_bytes()
        assert dirs == self.tree.dirs
        assert files == {p: v.data for p, v in self.tree.files.items()}


def describe(got: bytes, offset: int, history: list[Version]) -> str:
    """Which versions each block-aligned piece of a wrong read came from (for the message)."""
    pieces = []
    pos = offset
    while pos < offset + len(got):
        end = min((pos // BLOCK_SIZE + 1) * BLOCK_SIZE, offset + len(got))
        piece = got[pos - offset : end - offset]
        sources = [repr(v) for v in history if content(v.vid, min(end, v.size))[pos:] == piece]
        sources = sources or ["no version"]
        pieces.append(f"[{pos}, {end}): {' or '.join(sources)}")
        pos = end
    return "; ".join(pieces) or "empty"


def note(text: str) -> None:
    """A statistics event (--hypothesis-show-statistics); a no-op outside hypothesis."""
    if currently_in_test_context():
        event(text)


# --- the harness -----------------------------------------------------------------------------


@dataclass
class Held:
    fh: int
    path: str
    version: Version


class Harness:
    def __init__(self, remote: Remote, master: RpcClient, vfs: Vfs, reader: DataReader):
        self.remote = remote
        self.master = master
        self.vfs = vfs
        self.reader = reader
        self.snap = remote.tree.copy()  # what the client sees: the last sync
        self.inos: dict[str, int] = {}  # path -> inode in the current snapshot
        self.polled_inos: dict[str, int] = {}  # inodes when the client last polled
        self.unpolled_inos: list[dict[str, int]] = []  # inodes of each sync since
        self.all_inos: set[int] = set()
        self.lookups: dict[int, int] = {}  # kernel lookup counts the client has handed out
        self.held: list[Held] = []
        self.step = ""

    # ---- helpers ----------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        raise AssertionError(f"{self.step}: {message}")

    def is_current(self, path: str, version: Version) -> bool:
        """The remote store still holds exactly this version of the file."""
        current = self.remote.tree.files.get(path)
        return current is not None and current.vid == version.vid

    async def resolve(self, path: str) -> Attr | CacheFsError:
        """Walks the path from the root with Vfs.lookup, as the kernel does."""
        attr = self.vfs.root
        for name in (p for p in path.split("/") if p):
            try:
                attr = await self.vfs.lookup(attr.ino, name)
            except CacheFsError as exc:
                return exc
            self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1
        return attr

    def check_attr(self, path: str, attr: Attr) -> None:
        kind = self.snap.kind(path)
        if attr.kind != kind:
            self.fail(f"{path!r} has kind {attr.kind}, the snapshot says {kind}")
        if path == "":
            return
        ino = self.inos.get(path)
        if ino is not None and attr.ino != ino:
            self.fail(f"{path!r} has inode {attr.ino}, earlier in this snapshot {ino}")
        if kind == KIND_FILE:
            version = self.snap.files[path]
            if (attr.size, attr.mtime_ns) != (version.size, version.mtime_ns):
                self.fail(
                    f"{path!r}: size {attr.size}, mtime {attr.mtime_ns}; the snapshot has "
                    f"{version.size}, {version.mtime_ns}"
                )
        elif attr.size != 0:
            self.fail(f"directory {path!r} has size {attr.size}")

    async def lookup(self, path: str) -> Attr | None:
        """Resolves and checks `path`; returns its attributes if the snapshot has it."""
        found = await self.resolve(path)
        if self.snap.kind(path) is None:
            if not isinstance(found, CacheFsError):
                self.fail(f"{path!r} found ({found}), but the snapshot does not have it")
            expected = self.snap.expected_error(path)
            if found.errno != expected:
                self.fail(f"{path!r}: errno {found.errno} ({found!r}), expected {expected}")
            return None
        if isinstance(found, CacheFsError):
            self.fail(f"{path!r} is in the snapshot, lookup failed: {found!r}")
        self.check_attr(path, found)
        if await self.vfs.getattr(found.ino) != found:
            self.fail(f"getattr of {path!r} differs from its lookup")
        return found

    async def listdir(self, path: str) -> list[tuple[str, Attr]] | None:
        attr = await self.lookup(path)
        if attr is None:
            return None
        if not attr.is_dir:
            try:
                await self.vfs.opendir(attr.ino)
            except CacheFsError as exc:
                if exc.errno != errno.ENOTDIR:
                    self.fail(f"opendir of file {path!r}: {exc!r}")
                return None
            self.fail(f"opendir of file {path!r} succeeded")
        fh = await self.vfs.opendir(attr.ino)
        entries: list[tuple[str, Attr]] = []
        try:
            while page := await self.vfs.readdir(fh, len(entries)):
                for name, child, position in page:
                    if position != len(entries) + 1:
                        self.fail(f"readdir of {path!r}: position {position} after {entries}")
                    entries.append((name, child))
                    self.vfs.readdir_accepted(fh, name, child)  # readdirplus
                    self.lookups[child.ino] = self.lookups.get(child.ino, 0) + 1
        finally:
            self.vfs.releasedir(fh)
        names = [name for name, _ in entries]
        if names != self.snap.children(path):
            self.fail(f"readdir {path!r}: {names}, the snapshot has {self.snap.children(path)}")
        for name, child in entries:
            self.check_attr(f"{path}/{name}" if path else name, child)
        return entries

    def check_bytes(
        self, got: bytes | CacheFsError, held: Held, offset: int, size: int, what: str
    ) -> None:
        expected = content(held.version.vid, min(offset + size, held.version.size))[offset:]
        large = held.version.size > BLOCK_SIZE
        current = self.is_current(held.path, held.version)
        note(
            f"{'large' if large else 'small'} {'current' if current else 'stale'} read: "
            f"{'error' if isinstance(got, CacheFsError) else 'bytes'}"
        )
        if isinstance(got, CacheFsError):
            if current:
                self.fail(f"{what} of unchanged {held.path!r} failed: {got!r}")
            return  # the remote lost this version: an error is all the client can honestly do
        if got != expected:
            history = self.remote.history[held.path]
            since = history[history.index(held.version) :]
            self.fail(
                f"{what} of {held.path!r} at {offset}+{size} opened on {held.version!r}: got "
                f"{len(got)} bytes, expected {len(expected)}; the bytes are "
                f"{describe(got, offset, history)}; remote versions since: {since}"
            )

    async def open(self, path: str) -> Held | None:
        """Opens `path` if the snapshot has a file there; checks the error otherwise."""
        attr = await self.lookup(path)
        if attr is None:
            return None
        if attr.is_dir:
            try:
                await self.vfs.open(attr.ino, os.O_RDONLY)
            except CacheFsError as exc:
                if exc.errno != errno.EISDIR:
                    self.fail(f"open of directory {path!r}: {exc!r}")
                return None
            self.fail(f"open of directory {path!r} succeeded")
        fh = await self.vfs.open(attr.ino, os.O_RDONLY)
        return Held(fh, path, self.snap.files[path])

    async def read(self, held: Held, offset: int, size: int) -> bytes | CacheFsError:
        direct = self.reader.direct_reads
        try:
            got = await self.vfs.read(held.fh, offset, size)
        except CacheFsError as exc:
            got = exc
        if self.reader.direct_reads != direct and self.is_current(held.path, held.version):
            self.fail(f"a read of unchanged {held.path!r} bypassed the worker")
        return got

    # ---- remote-side operations -------------------------------------------------------------

    async def sync(self, poll: bool) -> None:
        old = self.snap
        report = await self.master.call("dataset_sync", name=DATASET)
        new = self.snap = self.remote.tree.copy()
        self.check_report(report, old, new)
        await self.check_snapshot(old)
        self.unpolled_inos.append(dict(self.inos))
        if poll:
            await self.poll()

    def check_report(self, report: dict, old: Tree, new: Tree) -> None:
        common = old.files.keys() & new.files.keys()
        expected = {
            "added": len(new.files.keys() - old.files.keys()),
            "changed": sum(old.files[p].vid != new.files[p].vid for p in common),
            "removed": len(old.files.keys() - new.files.keys()),
            "dirs_added": len(new.dirs - old.dirs),
            "dirs_removed": len(old.dirs - new.dirs),
            "files": len(new.files),
            "dirs": len(new.dirs),
            "bytes": sum(v.size for v in new.files.values()),
        }
        got = {k: report[k] for k in expected}
        if got != expected:
            self.fail(f"sync report {got}, expected {expected}")

    async def check_snapshot(self, old: Tree) -> None:
        """After a sync: every path's attributes and listing, inode rules, statfs, EROFS."""
        old_inos, self.inos = self.inos, {}
        for path in PROBE_PATHS + self.snap.paths():
            attr = await self.lookup(path)
            if attr is not None:
                self.inos[path] = attr.ino
        for path in ["", *sorted(self.snap.dirs)]:
            await self.listdir(path)  # also checks each entry's inode against its lookup
        if sorted(self.inos) != self.snap.paths():
            self.fail(f"resolved {sorted(self.inos)}, the snapshot has {self.snap.paths()}")
        if len(set(self.inos.values()) | {self.vfs.root.ino}) != len(self.inos) + 1:
            self.fail(f"inode numbers are not unique: {self.inos}")
        for path, ino in self.inos.items():
            same = old.state(path) == self.snap.state(path) and path in old_inos
            if same and ino != old_inos[path]:
                self.fail(f"unchanged {path!r} moved from inode {old_inos[path]} to {ino}")
            if not same and ino in self.all_inos:
                self.fail(f"new or changed {path!r} reuses inode {ino}")
        self.all_inos.update(self.inos.values())
        statfs = await self.vfs.statfs()
        expected = {
            "files": len(self.snap.files),
            "dirs": len(self.snap.dirs),
            "bytes": sum(v.size for v in self.snap.files.values()),
        }
        if statfs != expected:
            self.fail(f"statfs {statfs}, expected {expected}")
        for path in sorted(self.snap.files)[:1]:
            try:
                await self.vfs.open(self.inos[path], os.O_WRONLY)
            except CacheFsError as exc:
                if exc.errno != errno.EROFS:
                    self.fail(f"open for writing of {path!r}: {exc!r}")
            else:
                self.fail(f"open for writing of {path!r} succeeded")

    async def poll(self) -> None:
        """Applies the change log: it must name every entry the kernel may hold stale.

        An entry is stale when its path resolves to another inode than when the client last
        polled (a new version, a kind change, a removal, a directory removed and made again).
        It is named by its parent's inode, so only entries whose parent is still the same
        directory are checked. When the log no longer reaches back, the client must drop every
        entry it still holds (`lookups` here).
        """
        changes = await self.vfs.poll_changes()
        got = set(changes.entries)
        complete = len(self.unpolled_inos) <= CHANGE_LOG_GENERATIONS
        history = [self.polled_inos, *self.unpolled_inos]
        needed: set[tuple[int, str]] = set()
        allowed: set[tuple[int, str]] = set()
        for path in {p for inos in history for p in inos}:
            parent, _, name = path.rpartition("/")
            then, now = self.polled_inos.get(path), self.inos.get(path)
            parent_then = self.ino(self.polled_inos, parent)
            same_parent = parent_then is not None and parent_then == self.ino(self.inos, parent)
            known = complete or self.lookups.get(then, 0) > 0  # may the client still hold it
            if then != now and same_parent and known:
                needed.add((parent_then, name))
            for older, newer in itertools.pairwise(history):
                if older.get(path) != newer.get(path):
                    allowed.update((self.ino(inos, parent), name) for inos in (older, newer))
        if needed - got:
            self.fail(f"poll_changes did not invalidate {sorted(needed - got)}; got {sorted(got)}")
        root = self.vfs.root.ino
        parents = {p for p, _ in needed if p == root or self.lookups.get(p, 0) > 0}
        if parents - set(changes.inodes):
            self.fail(f"poll_changes did not refresh directories {sorted(parents)}: {changes}")
        if complete and got - allowed:
            self.fail(f"poll_changes invalidated unchanged entries {sorted(got - allowed)}")
        info = await self.master.call("dataset_info", name=DATASET)
        if self.vfs.generation != info["generation"]:
            self.fail(f"client at generation {self.vfs.generation} after a poll, master at {info}")
        changed = ", entries to drop" if needed else ""
        note(f"poll: {'complete' if complete else 'incomplete'} change log{changed}")
        self.polled_inos, self.unpolled_inos = dict(self.inos), []

    def ino(self, inos: dict[str, int], path: str) -> int | None:
        return self.vfs.root.ino if path == "" else inos.get(path)

    # ---- steps ------------------------------------------------------------------------------

    def pick(self, target: int) -> str:
        files = sorted(self.snap.files)
        return files[target % len(files)] if files else "f"

    async def run(self, op) -> None:
        self.step = repr(op)
        match op:
            case Put(path, size):
                self.remote.put(path, size)
            case Delete(path):
                self.remote.delete(path)
            case Sync(poll, times):
                for i in range(times):
                    await self.sync(poll and i == times - 1)
            case Read(int() as target, offset, size):
                await self.run(Read(self.pick(target), offset, size))
            case ReadAll(int() as target, chunk):
                await self.run(ReadAll(self.pick(target), chunk))
            case ReadConcurrent(int() as target, n):
                await self.run(ReadConcurrent(self.pick(target), n))
            case Open(int() as target):
                await self.run(Open(self.pick(target)))
            case Lookup(path):
                await self.lookup(path)
            case Readdir(path):
                await self.listdir(path)
            case Read(path, offset, size):
                held = await self.open(path)
                if held is not None:
                    got = await self.read(held, offset, size)
                    self.vfs.release(held.fh)
                    self.check_bytes(got, held, offset, size, "read")
            case ReadAll(path, chunk):
                held = await self.open(path)
                if held is not None:
                    await self.read_all(held, chunk)
            case ReadConcurrent(path, n):
                handles = [await self.open(path) for _ in range(n)]
                if handles[0] is not None:
                    await self.read_concurrently(handles)
            case Open(path):
                if len(self.held) < MAX_HELD:
                    held = await self.open(path)
                    if held is not None:
                        self.held.append(held)
            case ReadHeld(slot, offset, size):
                if self.held:
                    held = self.held[slot % len(self.held)]
                    got = await self.read(held, offset, size)
                    self.check_bytes(got, held, offset, size, "read from a held handle")
            case Close(slot):
                if self.held:
                    self.vfs.release(self.held.pop(slot % len(self.held)).fh)
            case Forget():
                self.vfs.forget(sorted(self.lookups.items()))
                # Another serving process of the mount may hold the inode in the kernel, so
                # the client asks the master: the inode's attributes while the snapshot has
                # it, ESTALE once it does not.
                # A client that has not polled a re-sync yet may still answer from the
                # snapshot it last polled.
                current = {ino: path for path, ino in self.inos.items()}
                polled = {*self.polled_inos.values()}
                polled.update(ino for inos in self.unpolled_inos for ino in inos.values())
                for ino in self.lookups:
                    try:
                        attr = await self.vfs.getattr(ino)
                    except CacheFsError as exc:
                        if exc.errno != errno.ESTALE or ino in current:
                            self.fail(f"getattr of forgotten inode {ino}: {exc!r}")
                        continue
                    path = current.get(ino)
                    if path is None:
                        if ino not in polled:
                            self.fail(f"inode {ino} answered after it left the snapshot")
                        continue
                    state = self.snap.files.get(path)
                    if attr.ino != ino or (state is not None and attr.size != state.size):
                        self.fail(f"inode {ino} of {path!r} answered {attr}, expected {state}")
                self.lookups.clear()
            case _:
                raise AssertionError(f"unknown operation {op!r}")

    async def read_all(self, held: Held, chunk: int) -> None:
        parts: list[bytes] = []
        offset = 0
        try:
            while True:
                got = await self.read(held, offset, chunk)
                if isinstance(got, CacheFsError):
                    self.check_bytes(got, held, offset, chunk, "sequential read")
                    return
                if not got:
                    break
                parts.append(got)
                offset += len(got)
        finally:
            self.vfs.release(held.fh)
        self.check_bytes(b"".join(parts), held, 0, held.version.size, "sequential read")

    async def read_concurrently(self, handles: list[Held]) -> None:
        results: list[bytes | CacheFsError] = [b""] * len(handles)

        async def one(i: int) -> None:
            results[i] = await self.read(handles[i], 0, handles[i].version.size + 1)

        async with trio.open_nursery() as nursery:
            for i in range(len(handles)):
                nursery.start_soon(one, i)
        for held, got in zip(handles, results, strict=True):
            self.vfs.release(held.fh)
            self.check_bytes(got, held, 0, held.version.size + 1, "concurrent read")


# --- one example -----------------------------------------------------------------------------


async def run_example(initial: list[Put], ops: list, tmp: Path) -> None:
    """Writes `initial`, starts master + worker + client, syncs, then runs and checks `ops`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vfs_module, "READDIR_PAGE", READDIR_PAGE)
        patch.setattr(master_sync, "CHANGE_LOG_GENERATIONS", CHANGE_LOG_GENERATIONS)
        await _run_example(initial, ops, tmp)


async def _run_example(initial: list[Put], ops: list, tmp: Path) -> None:
    remote = Remote(tmp / "remote")
    remote.root.mkdir()
    for put in initial:
        remote.put(put.path, put.size)
    store = BlockStore(tmp / "worker", mem_capacity=16 * MiB, shm_dir=tmp / "shm")
    direct_store = RemoteStore(remote.root.as_uri())

    async def direct() -> RemoteStore:
        return direct_store

    failure: AssertionError | None = None  # raised bare, not wrapped in the nurseries' groups
    try:
        async with trio.open_nursery() as servers:
            master_address = await servers.start(run_master, ("127.0.0.1", 0), tmp / "master")
            await servers.start(run_worker, master_address, ("127.0.0.1", 0), store)
            async with (
                RpcClient(master_address, name="master") as master,
                WorkerDirectory(functools.partial(master.call, "workers")) as workers,
                trio.open_nursery() as client_nursery,
            ):
                await master.call("dataset_add", name=DATASET, uri=remote.root.as_uri())
                await master.call("dataset_sync", name=DATASET)
                await workers.update()
                assert len(workers.workers) == 1, workers.workers
                reader = DataReader(DATASET, workers, direct)
                # Every lookup asks the master: the model's contract is that a client sees a
                # sync at once. Mounts answer known names from their cache until they poll
                # (fuse/vfs.py); tests/fuse/test_load_and_sync.py checks that on real mounts.
                vfs = Vfs(
                    DATASET, master, reader, client_nursery, MetaCache(tmp / "meta"),
                    cached_lookups=False,
                )  # fmt: skip
                await vfs.start()
                harness = Harness(remote, master, vfs, reader)
                try:
                    harness.step = "first sync"
                    await harness.check_snapshot(Tree())
                    harness.polled_inos = dict(harness.inos)
                    for op in ops:
                        with trio.fail_after(STEP_TIMEOUT):
                            await harness.run(op)
                    remote.check_disk()
                except AssertionError as exc:
                    failure = exc
                except Exception as exc:  # e.g. an unexpected error type, a blown deadline
                    failure = AssertionError(f"{harness.step}: {exc!r}")
                    failure.__cause__ = exc
                client_nursery.cancel_scope.cancel()
            servers.cancel_scope.cancel()
    finally:
        store.close()
    if failure is not None:
        raise failure


@settings(
    max_examples=int(os.environ.get("CACHEFS_MODEL_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(initial=st.lists(puts, min_size=1, max_size=8), ops=op_lists)
def test_client_matches_reference_model(initial: list[Put], ops: list) -> None:
    with tempfile.TemporaryDirectory(prefix="cachefs-model-") as tmp:
        trio.run(run_example, initial, ops, Path(tmp))


STALE_FILL_CASES = {
    # A small file overwritten with more bytes: the fill reads the new file's first 10 bytes.
    "small-file-grown": ([Put("f", 10)], [Put("f", 20), Read("f", 0, 100)]),
    # Same size, new mtime: the length check cannot see it.
    "small-file-same-size": ([Put("f", 10)], [Put("f", 10), Read("f", 0, 100)]),
    # Block 0 cached from v1 (the read at 5 is not sequential, so no readahead); after a
    # same-size overwrite one read across the block boundary joins v1's block 0 and v2's 1.
    "large-file-mixed-in-one-read": (
        [Put("f", 6 * MiB)],
        [Read("f", 5, 10), Put("f", 6 * MiB), Read("f", BLOCK_SIZE - 5, 10)],
    ),
    # The documented promise: a handle opened before a sync keeps reading the old version.
    "handle-opened-before-sync": (
        [Put("f", 10)],
        [Open("f"), Put("f", 20), Sync(), ReadHeld(0, 0, 100)],
    ),
}


@pytest.mark.parametrize("case", STALE_FILL_CASES)
def test_stale_versions_are_never_served(case: str, tmp_path: Path) -> None:
    """A read of a version the remote store no longer holds: old bytes or an error, never new."""
    initial, ops = STALE_FILL_CASES[case]
    # trio.run rather than an async test: pytest-trio would wrap the AssertionError in a group
    trio.run(functools.partial(run_example, initial, ops, tmp_path))
