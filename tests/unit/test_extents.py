"""worker/extents.py against a page-by-page reference model, plus its edge cases."""

from __future__ import annotations

import random

import pytest

from cachefs.worker.extents import PAGE, Extent, ExtentAllocator


def test_best_fit_takes_the_shortest_run_that_holds_the_object():
    alloc = ExtentAllocator(100 * PAGE)
    _, b, _, d = (alloc.allocate(n * PAGE) for n in (10, 3, 20, 5))
    alloc.free(b)  # a 3-page hole
    alloc.free(d)  # 5 pages, merged with the 62 free at the end
    assert alloc.allocate(2 * PAGE + 1) == Extent(b.start, 3)  # 3 pages fit best
    assert alloc.allocate(1) == Extent(d.start, 1)  # only the tail run is left
    assert alloc.free_pages == 100 - 10 - 3 - 20 - 1


def test_frees_merge_with_both_neighbours():
    alloc = ExtentAllocator(30 * PAGE)
    a, b, c = (alloc.allocate(10 * PAGE) for _ in range(3))
    assert alloc.allocate(1) is None and alloc.largest_free == 0
    alloc.free(a)
    alloc.free(c)
    assert alloc.free_runs() == [Extent(0, 10), Extent(20, 10)]
    alloc.free(b)
    assert alloc.free_runs() == [Extent(0, 30)] and alloc.largest_free == 30 * PAGE


def test_a_page_tail_is_the_only_waste():
    alloc = ExtentAllocator(10 * PAGE)
    assert alloc.allocate(1).pages == 1
    assert alloc.allocate(PAGE).pages == 1
    assert alloc.allocate(PAGE + 1).pages == 2
    assert alloc.used_bytes == 4 * PAGE


def test_claim_rebuilds_and_refuses_overlaps():
    alloc = ExtentAllocator(50 * PAGE)
    alloc.claim(Extent(10, 5))
    alloc.claim(Extent(0, 2))
    assert alloc.free_runs() == [Extent(2, 8), Extent(15, 35)]
    for bad in (Extent(12, 1), Extent(14, 2), Extent(49, 2), Extent(3, 0)):
        with pytest.raises(ValueError):
            alloc.claim(bad)
    with pytest.raises(ValueError, match="free already"):
        alloc.free(Extent(3, 1))
    with pytest.raises(ValueError, match="outside"):
        alloc.free(Extent(48, 5))


def test_random_operations_match_a_page_map():
    """Thousands of random allocate/free calls against a list of page owners."""
    rng = random.Random(7)
    pages = 600
    alloc = ExtentAllocator(pages * PAGE)
    owner: list = [None] * pages  # page -> the extent using it
    live: list[Extent] = []
    for step in range(5000):
        if live and rng.random() < 0.45:
            extent = live.pop(rng.randrange(len(live)))
            alloc.free(extent)
            for p in range(extent.start, extent.start + extent.pages):
                owner[p] = None
        else:
            length = rng.randint(1, 40 * PAGE)
            need = -(-length // PAGE)
            fitting = [r for r in _runs(owner) if r[1] >= need]
            extent = alloc.allocate(length)
            if extent is None:
                assert not fitting, step
                continue
            best = min(fitting, key=lambda r: (r[1], r[0]))
            assert (extent.start, extent.pages) == (best[0], need), step
            for p in range(extent.start, extent.start + need):
                assert owner[p] is None
                owner[p] = extent
            live.append(extent)
        assert [(e.start, e.pages) for e in alloc.free_runs()] == _runs(owner), step
        assert alloc.free_pages == owner.count(None)


def _runs(owner: list) -> list[tuple[int, int]]:
    """Maximal runs of free pages: (start, length)."""
    runs, start = [], None
    for p, o in enumerate([*owner, "end"]):
        if o is None and start is None:
            start = p
        elif o is not None and start is not None:
            runs.append((start, p - start))
            start = None
    return runs
