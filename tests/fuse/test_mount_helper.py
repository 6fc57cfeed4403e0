"""`mount -t cachefs` through the mount.cachefs helper, as /etc/fstab would use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.mount_helper import to_cli
from tests.fuse.conftest import make_files, read_all
from tests.procs import run_cli


def test_options_translate_to_flags():
    options = "rw,master=h:1,allow_other,_netdev,x-systemd.automount"
    assert to_cli(["ds", "/mnt/x", "-o", options]) == [
        "mount", "ds", "/mnt/x", "--master", "h:1", "--allow-other",
    ]  # fmt: skip
    assert to_cli(["-s", "s3://b/p", "/m", "-omem=1G,attr_timeout=60"]) == [
        "mount", "s3://b/p", "/m", "--mem", "1G", "--attr-timeout", "60",
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        to_cli(["only-one-arg"])


@pytest.fixture
def helper_installed():
    """mount(8) looks for /sbin/mount.<type>; link ours there for the test."""
    target = Path("/sbin/mount.cachefs")
    if target.exists() or target.is_symlink():
        pytest.fail(f"{target} already exists; refusing to replace it")
    target.symlink_to(Path(sys.executable).parent / "mount.cachefs")  # the venv's script
    try:
        yield
    finally:
        target.unlink()


def test_mount_t_cachefs_reads_a_dataset(helper_installed, mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 30, seed=31)
    mnt = tmp_path / "fstab-mnt"
    mnt.mkdir()
    mounts.mountpoints.append(mnt)  # unmounted at the end even if the test fails
    options = f"state={tmp_path / 'state'},mem=256M,_netdev"
    with mounts.tracking_tiers():  # an embedded mount: its RAM tier goes with the test
        result = subprocess.run(
            ["mount", "-t", "cachefs", source.as_uri(), str(mnt), "-o", options],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mnt)
    assert read_all(mnt, digests) == digests
    assert run_cli("umount", str(mnt)).returncode == 0
