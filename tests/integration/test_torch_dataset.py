"""cachefs.torch against real processes: a master and workers, a local-directory dataset, and
PyTorch DataLoaders with forked and spawned workers, the epoch's order hinted to the cluster,
and a worker killed and the master restarted in the middle of an epoch."""

from __future__ import annotations

import hashlib
import pickle
import signal
import time
import warnings

import pytest

torch = pytest.importorskip("torch")  # the [torch] extra, which scripts/setup.sh installs

from torch.utils.data import BatchSampler, DataLoader, RandomSampler  # noqa: E402

import cachefs.client  # noqa: E402
import cachefs.torch  # noqa: E402
from cachefs.torch import CachefsDataset, EpochPrefetchSampler, RawframeClips  # noqa: E402
from tests import procs  # noqa: E402
from tests.fuse.conftest import make_files  # noqa: E402
from tests.procs import run_cli, running_cluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    """A master and two workers as processes; yields (master, workers)."""
    with running_cluster(tmp_path, mem="64M") as (master, workers):
        yield master, workers


@pytest.fixture(autouse=True)
def close_clients():
    """Each test's clients (loop threads, connections) end with it."""
    yield
    for client in list(cachefs.client._CLIENTS):
        client.close()


def add_dataset(master, tmp_path, count, seed, name="ds", **kw) -> dict:
    """`count` files (tests.fuse.conftest.make_files) as a file:// dataset; rel -> sha256."""
    source = tmp_path / f"source-{name}"
    digests = make_files(source, count, seed=seed, **kw)
    procs.add_dataset(master, name, source)
    return digests


def sha(path: str, data: bytes) -> tuple[str, str]:
    """A transform (module level: spawned workers unpickle it)."""
    return path, hashlib.sha256(data).hexdigest()


def read_epoch(loader) -> list[tuple[str, str]]:
    """(path, sha256) of every item an epoch yields (batches of the default collate)."""
    out = []
    for paths, sums in loader:
        out.extend(zip(paths, sums, strict=True))
    return out


def jobs(ds: CachefsDataset) -> list[dict]:
    return ds.client._master("jobs")


def wait_job(ds: CachefsDataset, files: list[str], seconds: float = 60.0) -> dict:
    """The master's load job over exactly `files` (in that order), once it is done."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = next((j for j in jobs(ds) if j["files"] == files), None)
        if job is not None and job["state"] not in ("pending", "running"):
            return job
        time.sleep(0.1)  # polling the master's job table from outside
    raise AssertionError(f"no finished job over the epoch's order: {jobs(ds)}")


def test_every_item_is_the_source_file(cluster, tmp_path):
    master, _ = cluster
    digests = add_dataset(master, tmp_path, 300, seed=41)
    ds = CachefsDataset("ds", master=master.address)
    assert len(ds) == 300 and ds.paths == sorted(digests)
    assert {path: hashlib.sha256(data).hexdigest() for path, data in ds} == digests
    hashed = CachefsDataset("ds", master=master.address, transform=sha)
    assert dict(hashed[i] for i in range(len(hashed))) == digests
    copy = pickle.loads(pickle.dumps(hashed))  # what a spawned worker gets: no client
    assert copy._client is None and copy[7] == hashed[7]
    given = CachefsDataset("ds", client=cachefs.client.Client(master.address), paths="c000/*/f1*")
    assert given.master == master.address and len(given) == 30
    assert pickle.loads(pickle.dumps(given))[0] == given[0]


def test_glob_and_list_selection(cluster, tmp_path):
    master, _ = cluster
    digests = add_dataset(master, tmp_path, 300, seed=42)
    some = CachefsDataset("ds", master=master.address, paths="c000/v0001*/*.bin")
    assert some.paths == sorted(p for p in digests if p.startswith("c000/v0001"))
    deep = CachefsDataset("ds", master=master.address, paths="**/f[37].bin", transform=sha)
    assert deep.paths == sorted(p for p in digests if p.endswith(("/f3.bin", "/f7.bin")))
    assert dict(deep[i] for i in range(len(deep))) == {p: digests[p] for p in deep.paths}
    assert len(CachefsDataset("ds", master=master.address, paths="*/*.bin")) == 0
    assert len(CachefsDataset("ds", master=master.address, paths="nowhere/**")) == 0

    chosen = [sorted(digests)[i] for i in (250, 3, 77, 3)]
    listed = CachefsDataset("ds", master=master.address, paths=chosen, transform=sha)
    assert listed.paths == sorted(set(chosen))
    assert dict(listed[i] for i in range(len(listed))) == {p: digests[p] for p in chosen}
    with pytest.raises(FileNotFoundError):
        CachefsDataset("ds", master=master.address, paths=[chosen[0], "c000/v00001/nope.bin"])
    with pytest.raises(IsADirectoryError):
        CachefsDataset("ds", master=master.address, paths=["c000/v00001"])


def test_dataloader_reads_every_file_once(cluster, tmp_path):
    master, _ = cluster
    digests = add_dataset(master, tmp_path, 1000, seed=43)
    ds = CachefsDataset("ds", master=master.address, transform=sha)
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=2,  # forked workers
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    for _ in range(2):  # cold, then warm
        seen = read_epoch(loader)
        assert len(seen) == len(digests) and dict(seen) == digests


def test_spawned_workers_connect_on_their_own(cluster, tmp_path):
    master, _ = cluster
    digests = add_dataset(master, tmp_path, 100, seed=44)
    ds = CachefsDataset("ds", master=master.address, transform=sha)
    loader = DataLoader(ds, batch_size=10, num_workers=2, multiprocessing_context="spawn")
    seen = read_epoch(loader)
    assert len(seen) == len(digests) and dict(seen) == digests


def test_epoch_order_is_prefetched_into_the_workers(cluster, tmp_path):
    master, _ = cluster
    digests = add_dataset(master, tmp_path, 300, seed=45)
    ds = CachefsDataset("ds", master=master.address, transform=sha)
    empty = sum(1 for attr in ds._attrs if attr.size == 0)  # nothing to cache: always "cached"
    assert ds.client._master("load_check", dataset="ds")["cached_files"] == empty

    sampler = EpochPrefetchSampler(RandomSampler(ds, generator=torch.Generator()), ds, window=16)
    order = list(sampler)  # the epoch's indices; nothing is read
    assert sorted(order) == list(range(300)) and order != sorted(order)
    job = wait_job(ds, [ds.paths[i] for i in order])
    assert job["window"] == 16 and job["state"] == "done", job
    assert job["progress"]["failed_files"] == 0 and sampler.jobs == [job["id"]]
    check = ds.client._master("load_check", dataset="ds")  # on each file's owner
    assert check["cached_files"] == check["files"] == 300

    # A batch sampler wrapped, in a DataLoader: the next epoch's order, then its reads.
    batches = EpochPrefetchSampler(BatchSampler(RandomSampler(ds), 32, False), ds)
    seen = read_epoch(DataLoader(ds, batch_sampler=batches, num_workers=2))
    assert len(seen) == 300 and dict(seen) == digests
    assert wait_job(ds, [path for path, _ in seen])["window"] == 64

    master.stop()  # the hint fails: a warning, once, and the epoch goes on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert sorted(sampler) == list(range(300))
            sampler._sender.join()
    assert len(caught) == 1 and "prefetch hint not sent" in str(caught[0].message)


def test_a_large_epoch_is_hinted_chunk_by_chunk_in_order(cluster, tmp_path, monkeypatch):
    """An epoch's paths go as jobs of HINT_BYTES each (a call to the master carries at most
    1 MiB): two at once, the next as the sampler reaches the one before it."""
    master, _ = cluster
    add_dataset(master, tmp_path, 300, seed=47)
    ds = CachefsDataset("ds", master=master.address)
    monkeypatch.setattr(cachefs.torch, "HINT_BYTES", 2000)  # ~100 paths a job
    sampler = EpochPrefetchSampler(RandomSampler(ds), ds, window=8)
    indices = iter(sampler)
    sampler._sender.join()
    assert len(sampler.jobs) == 2
    order = [next(indices) for _ in range(150)]
    sampler._sender.join()
    assert len(sampler.jobs) == 3  # in the second chunk: the third is sent
    order += list(indices)
    by_id = {job["id"]: job for job in jobs(ds)}
    sent = [by_id[job_id]["files"] for job_id in sampler.jobs]
    assert len(sent) == 3 and all(sum(len(p) + 1 for p in files) <= 2000 for files in sent)
    assert sum(sent, []) == [ds.paths[i] for i in order] and sorted(order) == list(range(300))


def test_rawframe_clips(cluster, tmp_path):
    master, _ = cluster
    source = tmp_path / "frames"
    frames = {}
    for video, count in (("a/v1", 10), ("a/v2", 7), ("b/v3", 3)):
        for n in range(1, count + 1):
            frames[f"{video}/img_{n:05d}.jpg"] = f"{video} frame {n}".encode()
    for rel, data in frames.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    (source / "a" / "v1" / "meta.txt").write_text("not a frame")
    added = run_cli("dataset", "add", "frames", source.as_uri(), "--master", master.address)
    assert added.returncode == 0, added.stderr

    ds = CachefsDataset("frames", master=master.address, paths="**/img_*.jpg")
    clips = RawframeClips(ds, frames_per_clip=4, stride=3)
    # v1: frames 1-4, 4-7, 7-10; v2: 1-4, 4-7; v3 is shorter than a clip
    expect = [("a/v1", [1, 2, 3, 4]), ("a/v1", [4, 5, 6, 7]), ("a/v1", [7, 8, 9, 10]),
              ("a/v2", [1, 2, 3, 4]), ("a/v2", [4, 5, 6, 7])]  # fmt: skip
    got = [clips[i] for i in range(len(clips))]
    assert got == [(v, [frames[f"{v}/img_{n:05d}.jpg"] for n in ns]) for v, ns in expect]
    sampler = EpochPrefetchSampler(RandomSampler(clips), clips)
    order = list(sampler)
    wait_job(ds, [f"{expect[i][0]}/img_{n:05d}.jpg" for i in order for n in expect[i][1]])


def test_worker_killed_and_master_restarted_mid_epoch(cluster, tmp_path):
    """SIGKILL one of two workers and restart the master during an epoch: every item still
    arrives, once, with the source's bytes."""
    master, workers = cluster
    digests = add_dataset(master, tmp_path, 3000, seed=46, max_size=32_768)
    ds = CachefsDataset("ds", master=master.address, transform=sha)
    sampler = EpochPrefetchSampler(RandomSampler(ds), ds, window=32)
    loader = DataLoader(ds, sampler=sampler, batch_size=32, num_workers=2)
    seen = []
    for n, (paths, sums) in enumerate(loader):
        seen.extend(zip(paths, sums, strict=True))
        if n == 10:
            workers[0].stop(sig=signal.SIGKILL)
            master.stop(sig=signal.SIGKILL)
            master.start()  # same port and state
    assert len(seen) == len(digests) and dict(seen) == digests
    again = read_epoch(DataLoader(ds, sampler=sampler, batch_size=32, num_workers=2))
    assert len(again) == len(digests) and dict(again) == digests
