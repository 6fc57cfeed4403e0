"""One cache tier: a preallocated slab file, mmap'd, carved by a `SlabAllocator`.

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
from cachefs.worker.slab import SlabAllocator, Slot

#: Slabs as small as the largest object: a tier needs many more slabs than the size classes in
#: use, or slab rebalancing churns (measured: 1 GiB of 64 MiB slabs kept 24 of 3,000 log-normal
#: objects; of 4 MiB slabs, all of them). Small tiers (< 256 MiB) still churn; see docs.
SLAB_SIZE = BLOCK_SIZE


class Tier:
    def __init__(self, name: str, path: Path, capacity: int, *, slab_size: int | None = None):
        if capacity < BLOCK_SIZE:
            raise InvalidArgument(f"{name} tier needs at least {BLOCK_SIZE >> 20} MiB")
        self.name = name
        self.path = path
        self.slab_size = slab_size or SLAB_SIZE
        self.allocator = SlabAllocator(capacity, slab_size=self.slab_size, max_object=BLOCK_SIZE)
        self.capacity = self.allocator.slab_count * self.slab_size
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

    def write(self, slot: Slot, data: bytes | memoryview) -> None:
        self._view[slot.offset : slot.offset + len(data)] = data

    def read(self, slot: Slot, length: int) -> bytes:
        return self._map[slot.offset : slot.offset + length]

    def view(self, slot: Slot, length: int) -> memoryview:
        """Zero-copy view of a slot (valid only until the slot is freed)."""
        return self._view[slot.offset : slot.offset + length]

    @property
    def used_bytes(self) -> int:
        return self.allocator.allocated_bytes

    def close(self) -> None:
        self._view.release()
        self._map.close()
