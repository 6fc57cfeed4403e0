"""The short-circuit reader against a real BlockStore's files (lmdb index, slab files)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.shortcircuit import ShortCircuit, _Files
from cachefs.worker.store import BlockStore

MiB = 1 << 20


def filled_store(root: Path, *, disk: bool = False) -> tuple[dict, dict[bytes, bytes], dict]:
    """A store with some objects, closed again (as if its worker ran in another process)."""
    store = BlockStore(
        root / "state", mem_capacity=0 if disk else 64 * MiB, shm_dir=root / "shm",
        disk_dir=root / "disk" if disk else None, disk_capacity=64 * MiB if disk else 0,
    )  # fmt: skip
    rng = random.Random(7)
    objects = {}
    for i in range(40):
        data = rng.randbytes(rng.choice([1, 5000, 70_000, 1 * MiB + 3]))
        key = i.to_bytes(16, "big")
        assert store.put(key, data, "ds")
        objects[key] = data
    offsets = {key: store.location(key) for key in objects}
    token = store.locality()
    # The worker's own process may not open its index twice (lmdb's locks would break).
    assert ShortCircuit(enabled=True).read_sync("w", token, next(iter(objects))) is None
    store.close()
    return token, objects, offsets


@pytest.mark.parametrize("disk", [False, True])
def test_reads_what_the_worker_stored_at_the_worker_offsets(tmp_path, disk):
    token, objects, offsets = filled_store(tmp_path, disk=disk)
    files = _Files(token)
    try:
        for key, data in objects.items():
            loc = files.lookup(key)
            assert (loc.tier, loc.offset, loc.length) == (
                offsets[key].tier, offsets[key].slot.offset, len(data),
            )  # fmt: skip
        assert files.lookup(b"\0" * 20) is None
    finally:
        files.close()
    sc = ShortCircuit(enabled=True)
    try:
        assert all(sc.read_sync("w", token, key) == data for key, data in objects.items())
        assert sc.hits == len(objects)
    finally:
        sc.close()


def test_corrupt_truncated_or_replaced_tier_files_are_misses_never_bytes(tmp_path):
    token, objects, offsets = filled_store(tmp_path)
    key = next(k for k, d in objects.items() if len(d) > 100)
    tier = token["tiers"]["mem"]
    sc = ShortCircuit(enabled=True)
    try:
        with open(tier, "r+b") as f:
            f.seek(offsets[key].slot.offset + 50)
            f.write(b"\xff" if objects[key][50] != 0xFF else b"\0")
        assert sc.read_sync("w", token, key) is None
        assert sc.fallbacks == 1
        # A restarted worker with another geometry truncates the file: pread comes back
        # short (an mmap reader would die of SIGBUS here).
        os.truncate(tier, 0)
        other = next(k for k in objects if k != key)
        assert sc.read_sync("w", token, other) is None
        assert sc.fallbacks == 2
    finally:
        sc.close()
    # A replaced tier file (new inode) is noticed, so the reader reopens it.
    files = _Files(token)
    try:
        assert not files.changed()
        os.rename(tier, tier + ".old")
        Path(tier).write_bytes(b"")
        os.chmod(tier, 0o600)
        assert files.changed()
    finally:
        files.close()


def test_files_of_another_user_or_readable_by_others_are_not_opened(tmp_path):
    token, objects, _ = filled_store(tmp_path)
    os.chmod(token["tiers"]["mem"], 0o644)
    sc = ShortCircuit(enabled=True)
    try:
        assert sc.read_sync("w", token, next(iter(objects))) is None
        assert sc.hits == 0
    finally:
        sc.close()


def test_the_worker_frees_reader_slots_of_killed_clients(tmp_path):
    from cachefs.worker.index import CacheIndex

    index = CacheIndex(tmp_path / "state")
    try:
        index.set_meta("worker_id", "w")
        child = (
            "import lmdb, os, sys\n"
            "env = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=4)\n"
            "txn = env.begin()\n"
            "os._exit(0)  # dies inside its read transaction, like a killed client\n"
        )
        subprocess.run([sys.executable, "-c", child, str(index.path)], check=True)
        assert index.reader_check() == 1
        assert index.reader_check() == 0
    finally:
        index.close()
