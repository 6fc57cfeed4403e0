"""A cachefs mount reads exactly what the remote store holds, read-only, with POSIX errors."""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest

from tests.fuse.conftest import make_files, read_all, tree_listing
from tests.procs import run_cli


def test_local_dataset_20000_files(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 20_000, max_size=8192)
    mnt = mounts.embedded(source.as_uri())
    assert tree_listing(mnt) == tree_listing(source)
    for rel in random.Random(1).sample(sorted(digests), 200):  # exact mtimes, not just seconds
        assert os.stat(mnt / rel).st_mtime_ns == os.stat(source / rel).st_mtime_ns
    assert read_all(mnt, digests) == digests


def test_s3_dataset_2000_files(mounts, tmp_path, moto_server):
    source = tmp_path / "source"
    digests = make_files(source, 2000, max_size=65_536, seed=2)
    bucket = moto_server.create_bucket()
    moto_server.upload(bucket, {f"train/{rel}": (source / rel).read_bytes() for rel in digests})
    options = [f"-o{k}={v}" for k, v in moto_server.options.items()]
    mnt = mounts.embedded(f"s3://{bucket}/train", *options)
    mtimes = moto_server.mtimes(bucket, "train/")
    listing = tree_listing(mnt)
    assert {p for p, (d, _, _) in listing.items() if not d} == set(digests)
    for rel in digests:
        _, size, mtime = listing[rel]
        assert size == (source / rel).stat().st_size
        assert mtime == mtimes[rel] // 10**9
    assert read_all(mnt, digests) == digests


def try_open(path, mode):
    with open(path, mode):
        pass


def test_read_only_and_posix_errors(mounts, tmp_path):
    source = tmp_path / "source"
    make_files(source, 20)
    mnt = mounts.embedded(source.as_uri())
    a_file = mnt / "c000/v00000/f1.bin"
    checks = [
        (lambda: try_open(a_file, "r+b"), errno.EROFS),
        (lambda: try_open(a_file, "wb"), errno.EROFS),
        (lambda: try_open(mnt / "new.bin", "wb"), errno.EROFS),
        (lambda: os.unlink(a_file), errno.EROFS),
        (lambda: os.mkdir(mnt / "newdir"), errno.EROFS),
        (lambda: os.rename(a_file, mnt / "moved.bin"), errno.EROFS),
        (lambda: os.setxattr(a_file, "user.x", b"1"), errno.EROFS),
        (lambda: os.truncate(a_file, 0), errno.EROFS),
        (lambda: os.stat(mnt / "missing"), errno.ENOENT),
        (lambda: try_open(mnt / "c000/missing.bin", "rb"), errno.ENOENT),
        (lambda: os.stat(a_file / "child"), errno.ENOTDIR),
        (lambda: os.listdir(a_file), errno.ENOTDIR),
        (lambda: os.getxattr(a_file, "user.nothing"), errno.ENODATA),
    ]
    for action, expected in checks:
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == expected, (action, info.value)
    assert a_file.read_bytes() == (source / "c000/v00000/f1.bin").read_bytes()
    assert set(os.listxattr(a_file)) == {"user.cachefs.cached", "user.cachefs.owner"}
    assert int(os.getxattr(a_file, "user.cachefs.cached")) == a_file.stat().st_size
    assert os.getxattr(a_file, "user.cachefs.owner")
    assert os.statvfs(mnt).f_files == 20 + 1 + 2  # files + dirs (c000, its videos)


def test_64mib_file_random_reads(mounts, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    data = random.Random(7).randbytes(64 << 20)
    (source / "big.bin").write_bytes(data)
    mnt = mounts.embedded(source.as_uri())
    rng = random.Random(8)
    with open(mnt / "big.bin", "rb", buffering=0) as f:
        for _ in range(1000):
            offset = rng.randrange(len(data))
            size = rng.choice([1, 100, 4096, 65_536, 1 << 20, 5 << 20])
            f.seek(offset)
            assert f.read(size) == data[offset : offset + size]
    assert (mnt / "big.bin").read_bytes() == data  # sequential, with readahead


def test_large_directory_lists_completely(mounts, tmp_path):
    source = tmp_path / "source"
    (source / "flat").mkdir(parents=True)
    for i in range(12_000):  # several readdir pages and kernel buffers
        (source / "flat" / f"frame_{i:06d}.jpg").write_bytes(b"")
    mnt = mounts.embedded(source.as_uri())
    assert sorted(os.listdir(mnt / "flat")) == sorted(os.listdir(source / "flat"))


def test_umount_leaves_nothing_and_busy_mountpoint_is_refused(mounts, tmp_path):
    source = tmp_path / "source"
    make_files(source, 10)
    mnt = mounts.embedded(source.as_uri())
    second = mounts.mount(source.as_uri(), "--state", str(tmp_path / "s2"), check=False)
    assert second.returncode == 1
    assert "already a mount point" in second.stderr and second.stderr.count("\n") == 1
    result = run_cli("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mnt)
    leftovers = subprocess.run(
        ["pgrep", "-f", f"cachefs.cli mount .* {mnt}"], capture_output=True, text=True
    )
    assert leftovers.stdout == ""
    again = run_cli("umount", str(mnt))
    assert again.returncode == 2 and "is not mounted" in again.stderr


def test_bad_sources_fail_clearly(mounts, tmp_path):
    (tmp_path / "empty").mkdir()
    bad_scheme = mounts.mount("ftp://x/y", name="m1", check=False)
    assert bad_scheme.returncode == 2 and "unsupported scheme" in bad_scheme.stderr
    missing = mounts.mount((tmp_path / "nope").as_uri(), "--state", str(tmp_path / "s"),
                           name="m2", check=False)  # fmt: skip
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert not os.path.ismount(tmp_path / "m2")


def test_a_remount_serves_its_snapshot_and_resync_lists_again(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 50, seed=5)
    mnt = mounts.embedded(source.as_uri())
    assert read_all(mnt, digests) == digests

    def remount(*args):
        assert run_cli("umount", str(mnt)).returncode == 0
        return mounts.embedded(source.as_uri(), *args)

    (source / "added-later.bin").write_bytes(b"new")
    mnt = remount()  # the dataset was synced before: no listing, the snapshot as it was
    assert not (mnt / "added-later.bin").exists()
    assert read_all(mnt, digests) == digests  # its cache is still there
    mnt = remount("--resync")
    assert (mnt / "added-later.bin").read_bytes() == b"new"
