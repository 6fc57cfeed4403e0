"""The mount's shared metadata cache (fuse/metacache.py) on a real lmdb, also from a second
process, as a mount's serving processes share it."""

from __future__ import annotations

import subprocess
import sys

from cachefs.fuse.metacache import MetaCache
from cachefs.meta import KIND_DIR, KIND_FILE, Attr


def attr(ino: int, size: int = 10, kind: int = KIND_FILE) -> Attr:
    return Attr(ino, kind, size, 1_000, 1)


def test_what_one_process_learns_another_reads(tmp_path):
    first = MetaCache(tmp_path / "meta", fresh=True)
    try:
        first.remember(1, "a", "a", attr(5, kind=KIND_DIR))
        first.remember(5, "f", "a/f", attr(7))
        # Another serving process: its own handle on the same environment.
        probe = (
            "import sys; from pathlib import Path; from cachefs.fuse.metacache import MetaCache;"
            "m = MetaCache(Path(sys.argv[1]));"
            "print(repr((m.entry(5, 'f'), m.inode(7), m.entry(5, 'x'), m.inode(99),"
            " sorted(m.entries()))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path / "meta")],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        expected = (attr(7), (attr(7), "a/f", 5, "f"), None, None, [(1, "a"), (5, "f")])
        assert out.strip() == repr(expected)
    finally:
        first.close()


def test_a_new_inode_for_a_name_drops_the_old_one(tmp_path):
    meta = MetaCache(tmp_path / "meta", fresh=True)
    meta.remember(1, "f", "f", attr(7))
    meta.remember(1, "f", "f", attr(8, size=20))  # a re-sync: new version, new inode
    assert meta.entry(1, "f") == attr(8, size=20)
    assert meta.inode(7) is None
    meta.close()


def test_drop_and_clear_forget_names_and_their_inodes(tmp_path):
    meta = MetaCache(tmp_path / "meta", fresh=True)
    meta.remember(1, "f", "f", attr(7))
    meta.remember(1, "g", "g", attr(8))
    meta.remember_inode("h", attr(9))  # asked of the master by number: no name
    meta.drop([(1, "f"), (1, "never-known")])
    assert meta.entry(1, "f") is None and meta.inode(7) is None
    assert meta.entry(1, "g") == attr(8) and meta.inode(9) == (attr(9), "h", 0, "")
    meta.update_attr(attr(8, size=30))
    assert meta.entry(1, "g") == attr(8, size=30)
    meta.clear()
    assert meta.entries() == [] and meta.inode(8) is None and meta.inode(9) is None
    meta.close()


def test_a_fresh_cache_starts_empty(tmp_path):
    meta = MetaCache(tmp_path / "meta", fresh=True)
    meta.remember(1, "f", "f", attr(7))
    meta.close()
    again = MetaCache(tmp_path / "meta", fresh=True)
    assert again.entry(1, "f") is None
    again.close()
