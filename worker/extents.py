"""Page-granular extent allocator for a cache tier: where each object lives (pure policy).

It replaced a slab allocator (size classes carved out of 4 MiB slabs), which needs many more
slabs than the size classes in use: a 64 MiB tier (16 slabs for ~40 classes of a rawframes
mix) kept 8% of its bytes live, 1 GiB 82% (benchmarks/results.md, "Retention (#17)"). Here an
object takes a contiguous run of whole pages, anywhere: no classes, so the only waste is the
tail of its last page, and eviction frees exactly the pages of the entries it drops.

Free space is a set of maximal runs (neighbours always merged), indexed by start and by end
(dicts) and by (length, start) and by start (sorted lists): `allocate` is best fit (the
shortest run that holds the object, lowest address on ties, which keeps large runs whole),
`free` merges with both neighbours. Costs: O(log n) searches and O(n) list inserts/deletes
over n free runs, which stay few while the tier is full (each eviction merges holes).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass

__all__ = ["Extent", "ExtentAllocator", "PAGE"]

PAGE = 4096


@dataclass(frozen=True, slots=True)
class Extent:
    """Pages [start, start + pages) of the tier file."""

    start: int
    pages: int

    @property
    def offset(self) -> int:
        return self.start * PAGE

    @property
    def capacity(self) -> int:
        return self.pages * PAGE


class ExtentAllocator:
    def __init__(self, capacity: int):
        if capacity < PAGE:
            raise ValueError(f"a tier needs at least one {PAGE}-byte page")
        self.pages = capacity // PAGE
        self.capacity = self.pages * PAGE
        self._by_start: dict[int, int] = {}  # start -> length of a free run
        self._by_end: dict[int, int] = {}  # end (exclusive) -> start
        self._sizes: list[tuple[int, int]] = []  # (length, start), sorted
        self._starts: list[int] = []  # starts, sorted
        self._add(0, self.pages)
        self.free_pages = self.pages

    @staticmethod
    def pages_for(length: int) -> int:
        return max(1, -(-length // PAGE))

    @property
    def used_bytes(self) -> int:
        return (self.pages - self.free_pages) * PAGE

    @property
    def largest_free(self) -> int:
        """Bytes of the longest free run (what the largest single allocation can take)."""
        return self._sizes[-1][0] * PAGE if self._sizes else 0

    def allocate(self, length: int) -> Extent | None:
        """A run for `length` bytes (best fit), or None if no free run is long enough."""
        need = self.pages_for(length)
        i = bisect_left(self._sizes, (need, -1))
        if i == len(self._sizes):
            return None
        run, start = self._sizes[i]
        self._remove(start, run)
        if run > need:
            self._add(start + need, run - need)
        self.free_pages -= need
        return Extent(start, need)

    def free(self, extent: Extent) -> None:
        """Returns a run allocated (or claimed) before; merges it with free neighbours."""
        start, pages = extent.start, extent.pages
        end = start + pages
        if start < 0 or pages < 1 or end > self.pages:
            raise ValueError(f"{extent} is outside the tier's {self.pages} pages")
        if self._overlaps_free(start, end):
            raise ValueError(f"{extent} is (partly) free already")
        self.free_pages += pages
        before = self._by_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            start = before
        after = self._by_start.get(end)
        if after is not None:
            self._remove(end, after)
            end += after
        self._add(start, end - start)

    def claim(self, extent: Extent) -> None:
        """Marks a run used that must be entirely free (rebuilding from a persisted index)."""
        start, end = extent.start, extent.start + extent.pages
        i = bisect_right(self._starts, start) - 1
        if extent.pages < 1 or i < 0 or self._starts[i] + self._by_start[self._starts[i]] < end:
            raise ValueError(f"{extent} is not inside one free run")
        run_start = self._starts[i]
        run = self._by_start[run_start]
        self._remove(run_start, run)
        if start > run_start:
            self._add(run_start, start - run_start)
        if end < run_start + run:
            self._add(end, run_start + run - end)
        self.free_pages -= extent.pages

    def free_runs(self) -> list[Extent]:
        """The free runs in address order (tests, stats)."""
        return [Extent(s, self._by_start[s]) for s in self._starts]

    # --- the four indexes, kept in step -----------------------------------------------------

    def _overlaps_free(self, start: int, end: int) -> bool:
        i = bisect_right(self._starts, start) - 1  # the last free run starting at or before
        if i >= 0 and self._starts[i] + self._by_start[self._starts[i]] > start:
            return True
        return i + 1 < len(self._starts) and self._starts[i + 1] < end

    def _add(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        insort(self._sizes, (length, start))
        insort(self._starts, start)

    def _remove(self, start: int, length: int) -> None:
        del self._by_start[start]
        del self._by_end[start + length]
        self._sizes.pop(bisect_left(self._sizes, (length, start)))
        self._starts.pop(bisect_left(self._starts, start))
