"""Cluster mode (master + 2 workers as processes) surviving a worker death, and PyTorch."""

from __future__ import annotations

import hashlib
import threading

from tests.fuse.conftest import make_files, read_all
from tests.procs import master_process, run_cli, worker_process


def test_cluster_mount_survives_a_killed_worker(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 3000, max_size=32_768, seed=3)
    master = master_process(tmp_path)
    master.start()
    workers = [worker_process(tmp_path, master.address, f"w{i}", "128M") for i in (1, 2)]
    try:
        for w in workers:
            w.start()
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
    finally:
        for w in workers:
            w.stop()
        master.stop()


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
