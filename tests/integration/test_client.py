"""cachefs.client against a real master and workers (processes, TCP, a local-directory store):
every byte through each call, metadata, errors as OSErrors, threads, fork, deadlines, secrets."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachefs.client import Client
from cachefs.meta import BLOCK_SIZE
from tests.fuse.conftest import make_files
from tests.procs import add_dataset, running_cluster

NAME = "frames"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master, two workers and a dataset of 120 small files and one of 2.5 blocks."""
    tmp = tmp_path_factory.mktemp("client")
    src = tmp / "src"
    digests = make_files(src, 120, max_size=20_000, seed=8)
    big = os.urandom(2 * BLOCK_SIZE + BLOCK_SIZE // 2)
    (src / "big.bin").write_bytes(big)
    with running_cluster(tmp) as (master, workers):
        add_dataset(master, NAME, src)
        yield master, workers, src, digests, big


@pytest.fixture
def client(cluster):
    with Client(cluster[0].address) as c:
        yield c


def test_every_byte_cold_then_warm_and_warm_reads_take_the_short_circuit(cluster, client):
    _, _, _, digests, big = cluster
    for _ in range(2):
        for rel, digest in digests.items():
            assert sha(client.read_bytes(NAME, rel)) == digest, rel
        assert client.read_bytes(NAME, "big.bin") == big
    # Both workers run on this host as this user: the second pass read their files directly.
    assert client._io.workers.shortcircuit.hits >= len([d for d in digests if d])


def test_ranges_and_file_objects_across_blocks(cluster, client):
    big = cluster[4]
    edge = BLOCK_SIZE - 7
    assert client.read_range(NAME, "big.bin", edge, 20) == big[edge : edge + 20]
    assert client.read_range(NAME, "big.bin", BLOCK_SIZE * 2, -1) == big[BLOCK_SIZE * 2 :]
    assert client.read_range(NAME, "big.bin", len(big) + 5, 10) == b""
    with client.open(NAME, "big.bin") as f:
        assert f.seek(-10, os.SEEK_END) == len(big) - 10
        assert f.read() == big[-10:]
        f.seek(edge)
        buffer = bytearray(30)
        assert f.readinto(buffer) == 30 and bytes(buffer) == big[edge : edge + 30]
        assert f.tell() == edge + 30
        f.seek(0)
        assert f.read() == big


def test_metadata_matches_the_source_tree(cluster, client):
    src, digests = cluster[2], cluster[3]
    top = sorted(p.name for p in src.iterdir())
    assert client.listdir(NAME) == top
    walked = {f"{d}/{f}".lstrip("/") for d, _, files in client.walk(NAME) for f in files}
    assert walked == set(digests) | {"big.bin"}
    assert {s.path for s in client.files(NAME)} == walked
    rel = next(iter(digests))
    st = client.stat(NAME, rel)
    assert (st.path, st.is_dir, st.size) == (rel, False, (src / rel).stat().st_size)
    assert client.stat(NAME, rel.rsplit("/", 1)[0]).is_dir
    assert client.stat(NAME, f"/{rel}/").path == rel  # slashes around a path are dropped


def test_errors_are_oserrors_and_paths_stay_in_the_dataset(cluster, client):
    rel = next(iter(cluster[3]))
    with pytest.raises(FileNotFoundError):
        client.read_bytes(NAME, "no/such/file")
    with pytest.raises(FileNotFoundError):
        client.stat("no-such-dataset", "")
    with pytest.raises(IsADirectoryError):
        client.read_bytes(NAME, rel.rsplit("/", 1)[0])
    with pytest.raises(NotADirectoryError):
        client.listdir(NAME, rel)
    for bad in ("../etc/passwd", "a/./b", "a/../../b", "x\0y"):
        with pytest.raises(ValueError, match="invalid dataset path"):
            client.read_bytes(NAME, bad)


def test_threads_read_at_once(cluster, client):
    digests = cluster[3]
    rels = list(digests) * 4
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda rel: sha(client.read_bytes(NAME, rel)), rels))
    assert got == [digests[rel] for rel in rels]


def test_a_forked_child_reads_on_its_own_connections(cluster, client):
    digests = cluster[3]
    client.read_bytes(NAME, next(iter(digests)))  # the parent's loop and connections exist
    pid = os.fork()
    if pid == 0:  # the child: exit status says what it saw
        try:
            ok = all(sha(client.read_bytes(NAME, rel)) == d for rel, d in digests.items())
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's client is untouched by the child's.
    assert all(sha(client.read_bytes(NAME, rel)) == d for rel, d in digests.items())


def test_a_wrong_secret_is_refused(cluster, tmp_path):
    wrong = tmp_path / "secret"
    wrong.write_bytes(b"x" * 32)
    wrong.chmod(0o600)
    with pytest.raises(PermissionError):
        Client(cluster[0].address, secret_file=str(wrong)).stat(NAME, "")


def test_a_paused_master_costs_the_deadline_not_a_hang(cluster):
    master = cluster[0]
    with Client(master.address, timeout=2.0, attr_ttl=0) as c:
        c.stat(NAME, "")
        os.kill(master.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                c.stat(NAME, "big.bin")
            assert time.monotonic() - started < 10
        finally:
            os.kill(master.proc.pid, signal.SIGCONT)
        assert c.stat(NAME, "big.bin").size == len(cluster[4])
