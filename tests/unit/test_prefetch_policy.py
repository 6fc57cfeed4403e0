"""next_siblings: which files a cold read in a directory warms (pure, no I/O)."""

from __future__ import annotations

from cachefs.fuse.prefetch import next_siblings

FRAMES = [f"img_{i:05d}.jpg" for i in range(1, 101)]


def test_the_files_after_the_read_within_the_window():
    assert next_siblings(FRAMES, "img_00010.jpg", set(), 3) == FRAMES[10:13]


def test_nothing_past_the_last_file():
    assert next_siblings(FRAMES, "img_00099.jpg", set(), 8) == ["img_00100.jpg"]
    assert next_siblings(FRAMES, "img_00100.jpg", set(), 8) == []


def test_requested_files_are_not_asked_for_twice():
    requested = set(FRAMES[10:12])
    assert next_siblings(FRAMES, "img_00010.jpg", requested, 4) == FRAMES[12:14]


def test_a_name_not_in_the_listing_starts_after_its_place():
    # e.g. a large file (not prefetched, so not listed) read cold between two small ones
    assert next_siblings(FRAMES, "img_00010.zzz", set(), 2) == FRAMES[10:12]
