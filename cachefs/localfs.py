"""A file:// dataset as a jailed file system: its listing, stats and reads never leave the root.

`JailedLocalFs` answers the two pyarrow FileSystem calls RemoteStore makes (`get_file_info`,
`open_input_file`) for paths relative to the root, every one resolved through `cachefs.jail`;
being call-compatible keeps RemoteStore's retry, deadline and fault-injection paths the same for
every store. `LocalWalk` lists the tree for a sync.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from cachefs import jail


@dataclass(frozen=True, slots=True)
class LocalInfo:
    """The pyarrow FileInfo fields RemoteStore reads, plus permission bits and owner."""

    type: pafs.FileType
    size: int | None = None
    mtime_ns: int | None = None
    mode: int | None = None  # permission bits only (S_IMODE)
    uid: int | None = None
    gid: int | None = None


_MISSING = LocalInfo(pafs.FileType.NotFound)


def info_of(st: os.stat_result) -> LocalInfo:
    if stat.S_ISDIR(st.st_mode):
        kind = pafs.FileType.Directory
    elif stat.S_ISREG(st.st_mode):
        kind = pafs.FileType.File
    else:
        kind = pafs.FileType.Unknown
    return LocalInfo(
        kind, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    )


class JailedFile:
    """A regular file opened beneath the root; positional reads only (os.pread)."""

    def __init__(self, fd: int):
        self._fd = fd

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read(self) -> bytes:
        return self.read_at(None, 0)

    def read_at(self, nbytes: int | None, offset: int) -> bytes:
        """Up to `nbytes` (all, if None) from `offset`; short only at end of file."""
        parts = []
        while nbytes is None or nbytes > 0:
            chunk = os.pread(self._fd, 1 << 22 if nbytes is None else nbytes, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            if nbytes is not None:
                nbytes -= len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JailedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JailedLocalFs:
    """Paths are relative to `root` ("" is the root itself, whose own path is trusted)."""

    def __init__(self, root: str):
        self.root = root

    def get_file_info(self, path: str) -> LocalInfo:
        try:
            if not path:
                return info_of(os.stat(self.root))
            root_fd = jail.open_root(self.root)
            try:
                st = jail.stat_beneath(root_fd, path)
            finally:
                os.close(root_fd)
        except (FileNotFoundError, NotADirectoryError):
            return _MISSING
        return _MISSING if st is None else info_of(st)

    def open_input_file(self, path: str) -> JailedFile:
        root_fd = jail.open_root(self.root)
        try:
            fd, _ = jail.open_regular(root_fd, path)
        finally:
            os.close(root_fd)
        return JailedFile(fd)


class LocalWalk:
    """Depth-first os.scandir walk over directory fds, in bounded batches of (path, LocalInfo);
    each call runs in a thread. Only files and directories are returned.

    Directories are opened beneath the root without following a last-component link, so one
    swapped for a symlink mid-walk is skipped, not listed. Symlinks to files count as those
    files only if they resolve beneath the root; links to dirs (loops, escapes), broken links,
    links out of the root and special files are skipped.
    """

    def __init__(self, root: str):
        self._root = root
        self._root_fd = -1
        # (path prefix, scandir iterator, its directory fd: DirEntry.stat uses that fd)
        self._stack: list[tuple[str, Iterator[os.DirEntry[str]], int]] | None = None
        # An abandoned (timed-out) thread may still be walking when the generator closes;
        # closing a scandir iterator under it would be a use-after-free, so it closes last.
        self._lock = threading.Lock()
        self._closing = False

    def next_batch(self, n: int) -> list[tuple[str, LocalInfo]]:
        with self._lock:
            try:
                return self._next_batch(n)
            finally:
                if self._closing:
                    self._close_all()

    def _next_batch(self, n: int) -> list[tuple[str, LocalInfo]]:
        if self._stack is None:
            # Readable (scandir needs that); it also anchors every jailed open of the walk.
            self._root_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._stack = [("", os.scandir(self._root_fd), -1)]
        out: list[tuple[str, LocalInfo]] = []
        while self._stack and len(out) < n:
            prefix, it, _ = self._stack[-1]
            de = next(it, None)
            if de is None:
                self._pop()
                continue
            rel = prefix + de.name
            try:
                st = de.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                    fd = jail.open_beneath(self._root_fd, rel, flags)
                    try:
                        children = os.scandir(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    out.append((rel, info_of(st)))
                    self._stack.append((rel + "/", children, fd))
                elif stat.S_ISREG(st.st_mode):
                    out.append((rel, info_of(st)))
                elif stat.S_ISLNK(st.st_mode):
                    target = jail.stat_beneath(self._root_fd, rel)
                    if target is not None and stat.S_ISREG(target.st_mode):
                        out.append((rel, info_of(target)))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed or replaced while we walk, or a link that broke meanwhile
        return out

    def close(self) -> None:
        self._closing = True
        if self._lock.acquire(blocking=False):  # never block the event loop on a hung thread
            try:
                self._close_all()
            finally:
                self._lock.release()

    def _pop(self) -> None:
        _, it, fd = self._stack.pop()
        it.close()  # type: ignore[attr-defined]
        if fd >= 0:
            os.close(fd)

    def _close_all(self) -> None:
        while self._stack:
            self._pop()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
