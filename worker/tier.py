"""One cache tier: a preallocated file, mmap'd, carved into page runs by an `ExtentAllocator`.

MEM lives in /dev/shm (RAM that survives a worker restart but not a reboot), DISK in a file on a
local disk, preallocated with posix_fallocate so a full disk shows at start, not mid-write.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from cachefs.errors import InvalidArgument, NoSpace
from cachefs.meta import BLOCK_SIZE
from cachefs.worker.eviction import LruPolicy
from cachefs.worker.extents import Extent, ExtentAllocator


class Tier:
    def __init__(self, name: str, path: Path, capacity: int):
        if capacity < BLOCK_SIZE:
            raise InvalidArgument(f"{name} tier needs at least {BLOCK_SIZE >> 20} MiB")
        self.name = name
        self.path = path
        self.allocator = ExtentAllocator(capacity)
        self.capacity = self.allocator.capacity
        self.stored_bytes = 0  # the entries' own lengths (used_bytes counts whole pages)
        self.policy = LruPolicy()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        # An existing file of the right size keeps its contents: the index may point into it.
        self.reused = path.exists() and path.stat().st_size == self.capacity
        # Cached dataset bytes: private to the worker's user, whatever a previous run left.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if not self.reused:
                os.ftruncate(fd, 0)
                try:
                    os.posix_fallocate(fd, 0, self.capacity)
                except OSError as exc:
                    os.unlink(path)
                    if exc.errno == errno.ENOSPC:
                        raise NoSpace(
                            f"no room for a {self.capacity >> 20} MiB {name} tier at {path}"
                        ) from None
                    raise
            self._map = mmap.mmap(fd, self.capacity)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)

    def write(self, extent: Extent, data: bytes | memoryview) -> None:
        self._view[extent.offset : extent.offset + len(data)] = data

    def read(self, extent: Extent, length: int) -> bytes:
        return self._map[extent.offset : extent.offset + length]

    def view(self, extent: Extent, length: int) -> memoryview:
        """Zero-copy view of an entry's bytes (valid only until its pages are freed)."""
        return self._view[extent.offset : extent.offset + length]

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def close(self) -> None:
        self._view.release()
        self._map.close()
