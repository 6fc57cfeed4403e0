"""Zero-message open and several serving processes per mount (fuse/serving.py), on real mounts.

A mount with --procs N is one first process and N-1 helpers sharing the kernel connection:
each must answer any request (all state is by inode), and a serving process killed mid-read
must cost the readers nothing (its taken requests are resent to the others).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefs.fuse.mount import pid_file
from cachefs.runtime import read_pid_file
from tests.fuse.conftest import make_files, read_all
from tests.fuse.test_metrics import free_port, scrape
from tests.fuse.test_shortcircuit import add_dataset

pytestmark = pytest.mark.skipif(
    not hasattr(__import__("pyfuse3"), "attach"), reason="needs the patched pyfuse3 of setup.sh"
)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def helpers_of(pid: int) -> set[int]:
    """The mount's helper processes: children of its first process running cachefs.fuse.serving."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"cachefs.fuse.serving" in cmdline:
            found.add(int(entry.name))
    return found


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)  # another process's state: nothing to wait on but time
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_while(mnt: Path, digests: dict, action, after_files: int) -> None:
    """Reads every file with 8 threads; runs `action` once `after_files` reads have finished,
    while the rest are still to come; every read must give the right bytes."""
    done = []
    acted = threading.Event()
    got: dict[str, str] = {}

    def act_when_due():
        wait_until(lambda: len(done) >= after_files, what="reads to start")
        action()
        acted.set()

    actor = threading.Thread(target=act_when_due)
    actor.start()

    def one(rel):
        with open(mnt / rel, "rb") as f:
            got[rel] = hashlib.sha256(f.read()).hexdigest()
        done.append(rel)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, list(digests)))
    actor.join()
    assert acted.is_set()
    assert got == digests


def test_zero_message_open_sends_no_open_or_release(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 300, max_size=60_000, seed=3)
    port = free_port()
    mnt = mounts.embedded(source.as_uri(), "--procs", "1", "--metrics", f"127.0.0.1:{port}")
    first = sorted(digests)[0]  # alone: opens racing it could reach the mount before its ENOSYS
    assert read_all(mnt, [first], threads=1) == {first: digests[first]}
    assert read_all(mnt, digests) == digests
    drop_page_cache()
    assert read_all(mnt, digests) == digests  # opened again: still no OPEN
    m = scrape(port)
    nonempty = sum(1 for rel in digests if (source / rel).stat().st_size)
    # One OPEN answered ENOSYS switches the kernel to no_open for the mount's lifetime.
    assert m.get('cachefs_fuse_ops_total{op="open"}', 0) <= 1
    assert m.get('cachefs_fuse_ops_total{op="release"}', 0) == 0
    # Each small file is one READ per pass (readahead covers it); reads are by inode.
    assert nonempty <= m['cachefs_fuse_ops_total{op="read"}'] <= 2 * nonempty


def test_helpers_serve_and_a_killed_process_costs_readers_nothing(cluster, mounts, tmp_path):
    master, _ = cluster
    source = tmp_path / "source"
    digests = make_files(source, 2400, max_size=40_000, seed=9)
    add_dataset(master, source)
    port = free_port()
    mnt = mounts.mount(
        "ds", "--master", master.address, "--procs", "3", "--metrics", f"127.0.0.1:{port}"
    )
    first = read_pid_file(pid_file(mnt))["pid"]
    helpers = wait_until(lambda: len(helpers_of(first)) == 2 and helpers_of(first), what="helpers")
    rels = sorted(digests)
    parts = [{rel: digests[rel] for rel in rels[i::4]} for i in range(4)]

    assert read_all(mnt, parts[0]) == parts[0]

    # The first process stopped: its helpers alone answer lookups and reads.
    os.kill(first, signal.SIGSTOP)
    try:
        assert read_all(mnt, parts[1]) == parts[1]
    finally:
        os.kill(first, signal.SIGCONT)
    # The mount's metrics count the helpers' ops too: every file read so far was looked up
    # once, in whichever process (the helpers report every 2 s).
    looked_up = len(parts[0]) + len(parts[1])
    wait_until(
        lambda: scrape(port).get('cachefs_fuse_ops_total{op="lookup"}', 0) >= looked_up,
        what="the helpers' lookups in the mount's metrics",
    )

    # A helper killed mid-read: its requests are resent to the others, a new helper starts.
    victim = min(helpers)
    read_while(mnt, parts[2], lambda: os.kill(victim, signal.SIGKILL), after_files=100)
    replaced = wait_until(
        lambda: len(helpers_of(first)) == 2 and helpers_of(first), what="a new helper"
    )
    assert victim not in replaced

    # The first process killed mid-read: the helpers resend its requests and go on serving.
    read_while(mnt, parts[3], lambda: os.kill(first, signal.SIGKILL), after_files=100)
    wait_until(lambda: not alive(first), what="the first process to end")
    drop_page_cache()
    assert read_all(mnt, parts[0]) == parts[0]

    # Unmounting ends the helpers too.
    mounts.cleanup()
    mounts.mountpoints.clear()
    wait_until(lambda: not any(alive(pid) for pid in replaced), what="helpers to exit")
    # The first process removes the mount's shared cache at unmount; it was killed here.
    shutil.rmtree(pid_file(mnt).with_suffix(".meta"), ignore_errors=True)
