"""A mount sets its kernel readahead from --read-ahead-kb once FUSE_INIT is answered."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.fuse.conftest import make_files


def read_ahead_kb(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())


def wait_for_read_ahead(mnt: Path, want: int) -> int:
    deadline = time.monotonic() + 10
    while (got := read_ahead_kb(mnt)) != want and time.monotonic() < deadline:
        time.sleep(0.05)  # set by the mount's own task just after INIT: nothing to wait on
    return got


def test_default_and_flag_set_the_mount_readahead(mounts, tmp_path):
    source = tmp_path / "source"
    make_files(source, 3, seed=31)
    assert wait_for_read_ahead(mounts.embedded(source.as_uri()), 1024) == 1024
    other = mounts.embedded(source.as_uri(), "--read-ahead-kb", "2048", name="mnt2")
    assert wait_for_read_ahead(other, 2048) == 2048
