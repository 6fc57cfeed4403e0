"""Cluster mode (master + 2 workers as processes) surviving a worker death, and PyTorch."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time

import pytest

from cachefs.fuse.mount import pid_file
from cachefs.runtime import read_pid_file
from tests.fuse.conftest import make_files, read_all
from tests.procs import master_process, run_cli, worker_process


def test_cluster_mount_survives_a_killed_worker(cluster, mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 3000, max_size=32_768, seed=3)
    master, workers = cluster
    added = run_cli("dataset", "add", "frames", source.as_uri(), "--master", master.address)
    assert added.returncode == 0, added.stderr
    mnt = mounts.mount("frames", "--master", master.address)

    rels = sorted(digests)
    killed = threading.Event()

    def kill_after_some_reads():
        # Kill worker 1 (SIGKILL: no goodbye to the master) while readers are busy.
        workers[0].stop(sig=9)
        killed.set()

    timer = threading.Timer(0.5, kill_after_some_reads)
    timer.start()
    try:
        first = read_all(mnt, rels[:1500])  # raises on any read error
    finally:
        timer.join()
    assert killed.is_set()
    second = read_all(mnt, rels[1500:])
    assert {**first, **second} == digests


def test_pytorch_dataloader_reads_every_file(mounts, tmp_path):
    import torch  # the [torch] extra, which scripts/setup.sh installs
    from torch.utils.data import DataLoader, Dataset

    source = tmp_path / "source"
    digests = make_files(source, 5000, max_size=16_384, seed=4)
    mnt = mounts.embedded(source.as_uri())

    class Frames(Dataset):
        def __init__(self, root, rels):
            self.root, self.rels = root, rels

        def __len__(self):
            return len(self.rels)

        def __getitem__(self, i):
            with open(self.root / self.rels[i], "rb") as f:
                return self.rels[i], hashlib.sha256(f.read()).hexdigest()

    rels = sorted(digests)
    loader = DataLoader(Frames(mnt, rels), batch_size=64, num_workers=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    seen = {}
    for names, sums in loader:
        seen.update(zip(names, sums, strict=True))
    assert seen == digests


def test_hung_worker_costs_a_deadline_not_a_hang(mounts, tmp_path):
    """SIGSTOP the only worker: a read fails with ETIMEDOUT at --op-timeout instead of hanging."""
    source = tmp_path / "source"
    make_files(source, 20, seed=5)
    master = master_process(tmp_path)
    master.start()
    worker = worker_process(tmp_path, master.address, "w1", "64M")
    try:
        worker.start()
        added = run_cli("dataset", "add", "ds", source.as_uri(), "--master", master.address)
        assert added.returncode == 0, added.stderr
        mnt = mounts.mount("ds", "--master", master.address, "--op-timeout", "3")
        rel = "c000/v00000/f1.bin"
        assert (mnt / rel).read_bytes() == (source / rel).read_bytes()
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(OSError) as info:
                (mnt / "c000/v00000/f2.bin").read_bytes()
            assert info.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - started < 15
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
    finally:
        worker.stop()
        master.stop()


def test_sigterm_unmounts_cleanly(mounts, tmp_path):
    source = tmp_path / "source"
    make_files(source, 10, seed=6)
    mnt = mounts.embedded(source.as_uri())
    pid = read_pid_file(pid_file(mnt))["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for another process to exit: no event to wait on
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.ismount(mnt)


def test_backup_restores_into_a_new_master_that_mounts(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 60, seed=7)
    master = master_process(tmp_path)
    master.start()
    try:
        added = run_cli("dataset", "add", "ds", source.as_uri(), "--master", master.address)
        assert added.returncode == 0, added.stderr
        result = run_cli("master", "backup", "meta.backup", "--master", master.address)
        assert result.returncode == 0 and "backup of 1 datasets" in result.stdout, result.stderr
        backup = tmp_path / "master-state" / "backups" / "meta.backup"  # only there
        assert str(backup) in result.stdout
    finally:
        master.stop()

    not_backup = tmp_path / "junk"
    not_backup.write_bytes(b"\0" * 8192)
    bad = run_cli("master", "--state", str(tmp_path / "s-bad"), "--restore", str(not_backup))
    assert bad.returncode != 0

    restored = master_process(tmp_path / "r", "--restore", str(backup))
    (tmp_path / "r").mkdir()
    restored.start()
    worker = worker_process(tmp_path, restored.address, "w1", "64M")
    try:
        worker.start()
        mnt = mounts.mount("ds", "--master", restored.address)
        assert read_all(mnt, digests) == digests
    finally:
        worker.stop()
        restored.stop()
