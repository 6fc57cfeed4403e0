"""RAM given back (#17 item 4): real mounts, workers and `cachefs gc` on the real /dev/shm.

Each test asserts itself that the product removed its tiers; the `mounts` fixture's check is
only a safety net. Tests of workers and gc use a directory of their own in /dev/shm (same
tmpfs) so that other cachefs processes on the host never disturb them, nor they those.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cachefs.fuse.mount import pid_file
from cachefs.runtime import read_pid_file
from tests.fuse.conftest import SHM, make_files, read_all
from tests.procs import master_process, run_cli, stop_services, wait_for_line, worker_process

MiB = 1 << 20


def tiers(shm: Path = SHM) -> set[Path]:
    return set(shm.glob("cachefs-*"))


def lock_held(tier: Path) -> bool:
    """Whether a live process holds the tier's lock (probed here, not by cachefs code)."""
    try:
        fd = os.open(tier / "owner", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def owned_by(pid: int, shm: Path = SHM) -> list[Path]:
    found = []
    for tier in tiers(shm):
        try:
            if json.loads((tier / "owner").read_text())["pid"] == pid:
                found.append(tier)
        except (OSError, ValueError):
            continue
    return found


def new_orphans(before: set[Path], shm: Path = SHM) -> set[Path]:
    """Tier dirs made since `before` that no live process holds (others' live tiers may come
    and go on this host meanwhile)."""
    return {tier for tier in tiers(shm) - before if not lock_held(tier)}


def mount_record(mountpoint: Path) -> dict:
    record = read_pid_file(pid_file(mountpoint))
    assert record is not None, f"no live mount process for {mountpoint}"
    return record


def test_umount_gives_the_ram_tier_back(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 40)
    before = tiers()
    mnt = mounts.embedded(source.as_uri())
    (tier,) = owned_by(mount_record(mnt)["pid"])
    assert lock_held(tier) and (tier / "mem.slab").stat().st_size == 256 * MiB
    assert read_all(mnt, digests) == digests
    result = run_cli("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not tier.exists()
    assert new_orphans(before) == set()


def test_keep_cache_keeps_the_tiers_for_the_next_mount(mounts, tmp_path):
    source = tmp_path / "source"
    digests = make_files(source, 40, seed=3)
    disk = tmp_path / "disk"
    tier_args = ("--disk", str(disk), "--disk-size", "64M")
    before = tiers()
    mnt = mounts.embedded(source.as_uri(), "--keep-cache", *tier_args)
    (tier,) = owned_by(mount_record(mnt)["pid"])
    assert read_all(mnt, digests) == digests
    assert run_cli("umount", str(mnt)).returncode == 0
    assert (tier / "mem.slab").stat().st_size == 256 * MiB and not lock_held(tier)
    assert (disk / "disk.slab").exists()

    # A mount of the same state without --keep-cache starts from that cache, then gives it back.
    mnt = mounts.embedded(source.as_uri(), *tier_args)
    record = mount_record(mnt)
    assert owned_by(record["pid"]) == [tier]
    status = run_cli("status", "--json", "--master", record["master"],
                     "--secret-file", record["secret_file"])  # fmt: skip
    assert status.returncode == 0, status.stderr
    (worker,) = json.loads(status.stdout)["workers"]
    assert worker["stats"]["tiers"]["mem"]["used"] > 0  # kept entries, before any read
    assert read_all(mnt, digests) == digests
    assert run_cli("umount", str(mnt)).returncode == 0
    assert not tier.exists() and not (disk / "disk.slab").exists()
    assert new_orphans(before) == set()


def test_a_failed_start_leaves_nothing_in_shm(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEFS_LOG_LEVEL", "INFO")  # the mount's log says what it removed
    source = tmp_path / "source"
    make_files(source, 5)
    before = tiers()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_cli("mount", source.as_uri(), str(not_a_dir), "--state", str(tmp_path / "s0"))
    assert result.returncode == 2 and "is a file" in result.stderr, result.stderr

    # The mount process makes its tiers first, then fails: its source is gone.
    for keep in ((), ("--keep-cache",)):
        mnt = tmp_path / f"mnt{len(keep)}"
        mnt.mkdir()
        gone = (tmp_path / "gone").as_uri()
        result = run_cli("mount", gone, str(mnt), "--state", str(tmp_path / f"s{len(keep) + 1}"),
                         "--mem", "64M", *keep)  # fmt: skip
        assert result.returncode == 1 and "does not exist" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not os.path.ismount(mnt)
        log = pid_file(mnt).with_suffix(".log").read_text()
        removed = re.findall(r"RAM tier (/dev/shm/cachefs-\w+) removed", log)
        assert len(removed) == 1 and not Path(removed[0]).exists(), log
    assert new_orphans(before) == set()


def test_a_mount_above_its_share_of_shm_is_refused(tmp_path):
    source = tmp_path / "source"
    make_files(source, 5)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = os.statvfs(SHM)
    size = fs.f_blocks * fs.f_frsize
    over = f"{size // 2 // MiB + 64}M"  # the default share is 50 %
    before = tiers()
    args = ("mount", source.as_uri(), str(mnt), "--state", str(tmp_path / "state"), "--mem", over)
    for extra, code in (((), 1), (("--foreground",), 2)):  # 1: reported by `cachefs mount`
        result = run_cli(*args, *extra)
        assert result.returncode == code, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert re.fullmatch(
            r"cachefs: error: --mem \S+ GiB exceeds the share of /dev/shm left to RAM tiers: "
            r"50% of \S+ GiB = \S+ GiB(, .* taken by other cachefs tiers .*)?; lower --mem or "
            r"raise --shm-share",
            line,
        ), line
        assert not os.path.ismount(mnt)
    assert new_orphans(before) == set()


@pytest.fixture
def shm_dir():
    """A directory of this test's own on the real /dev/shm (not named cachefs-*)."""
    path = SHM / f"test-ram-tiers-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_gc_removes_orphaned_tiers_and_keeps_live_ones(tmp_path, shm_dir):
    master = master_process(tmp_path)
    master.start()
    killed, live = (
        worker_process(tmp_path, master.address, name, "64M", "--shm", str(shm_dir))
        for name in ("w1", "w2")
    )
    mapper = None
    try:
        for worker in (killed, live):
            worker.start()
        (orphan,) = owned_by(killed.proc.pid, shm_dir)
        (kept,) = owned_by(live.proc.pid, shm_dir)
        killed.proc.send_signal(signal.SIGKILL)  # no clean-up at all: the tier stays behind
        killed.stop()
        assert (orphan / "mem.slab").exists() and not lock_held(orphan)
        # A tier without a lock file (an older cachefs) that a live process still maps.
        old = shm_dir / "cachefs-0123456789ab"
        old.mkdir()
        (old / "mem.slab").write_bytes(bytes(MiB))
        mapper = subprocess.Popen(
            [sys.executable, "-c", "import mmap, sys; f = open(sys.argv[1], 'r+b'); "
             "m = mmap.mmap(f.fileno(), 0); print('mapped', flush=True); sys.stdin.read()",
             str(old / "mem.slab")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for_line(mapper, "mapped")

        dry = run_cli("gc", "--shm", str(shm_dir), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove {orphan} (64.0 MiB): no running process owns it" in dry.stdout
        assert (orphan / "mem.slab").exists()

        result = run_cli("gc", "--shm", str(shm_dir))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"removed {orphan} (64.0 MiB): no running process owns it"
        assert sorted(lines[1:3]) == sorted([
            f"kept {old} (1.0 MiB): mapped by pid {mapper.pid}",
            f"kept {kept} (64.0 MiB): in use by pid {live.proc.pid}",
        ])  # fmt: skip
        assert lines[3:] == ["removed 1 orphaned RAM tier(s) (64.0 MiB), kept 2"]
        assert not orphan.exists()
        assert lock_held(kept) and (kept / "mem.slab").stat().st_size == 64 * MiB
        assert sorted(os.listdir(old)) == ["mem.slab"]  # left as it was found

        mapper.stdin.close()
        assert mapper.wait(timeout=30) == 0
        result = run_cli("gc", "--shm", str(shm_dir))
        assert f"removed {old} (1.0 MiB): no running process owns it" in result.stdout
        assert tiers(shm_dir) == {kept} and live.proc.poll() is None

        killed.start()  # the killed worker comes back, with a new (cold) tier in the same place
        assert owned_by(killed.proc.pid, shm_dir) == [orphan]
    finally:
        if mapper is not None:
            mapper.kill()
            mapper.wait()
        stop_services(killed, live, master)


def test_a_worker_takes_only_the_tier_it_uses(tmp_path, shm_dir):
    master = master_process(tmp_path)
    master.start()
    first, second, third = (shm_dir / name for name in ("a", "b", "c"))
    worker = worker_process(tmp_path, master.address, "w1", "64M", "--shm", str(first))
    try:
        worker.start()
        (tier,) = tiers(first)
        state = worker.args[worker.args.index("--state") + 1]
        # A second worker on the same state would write into the same tier: refused.
        twin = run_cli("worker", "--master", master.address, "--state", state, "--mem", "64M",
                       "--shm", str(first))  # fmt: skip
        assert twin.returncode == 1, twin.stderr
        assert f"the RAM tier {tier} is in use by pid {worker.proc.pid}" in twin.stderr
        assert lock_held(tier)

        worker.stop()  # a stopped worker keeps its RAM tier for its restart
        assert (tier / "mem.slab").stat().st_size == 64 * MiB and not lock_held(tier)
        worker.args += ["--shm", str(second)]  # restarted elsewhere: the old tier goes
        worker.start()
        assert tiers(first) == set() and len(tiers(second)) == 1
        worker.stop()
        worker.args += ["--mem", "0", "--disk", str(tmp_path / "disk"), "--disk-size", "16M"]
        worker.start()  # no RAM tier any more: the one kept for it goes
        assert tiers(second) == set()
        worker.stop()

        # A start that fails after making its tiers (its port is taken) removes them.
        failed = run_cli("worker", "--master", master.address, "--listen", master.address,
                         "--state", str(tmp_path / "w2"), "--mem", "64M", "--shm", str(third),
                         "--disk", str(tmp_path / "disk2"), "--disk-size", "16M")  # fmt: skip
        assert failed.returncode == 1, failed.stderr
        assert tiers(third) == set() and not (tmp_path / "disk2" / "disk.slab").exists()
    finally:
        stop_services(worker, master)


def test_the_share_of_shm_is_checked_before_anything_is_made(tmp_path):
    small = tmp_path / "shm"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(small)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 MiB tmpfs: {mounted.stderr.strip()}")
    try:

        def worker(*args):
            result = run_cli("worker", "--master", "127.0.0.1:9", "--insecure", "--state",
                             str(tmp_path / "state"), "--shm", str(small), *args)  # fmt: skip
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            return result.returncode, result.stderr.strip().removeprefix("cachefs: error: ")

        assert worker("--mem", "36M") == (2, (
            f"--mem 36.0 MiB exceeds the share of {small} left to RAM tiers: 50% of 64.0 MiB "
            "= 32.0 MiB; lower --mem or raise --shm-share"
        ))  # fmt: skip
        assert os.listdir(small) == []
        other = small / "cachefs-orphan"  # another tier counts against the same share
        other.mkdir()
        (other / "mem.slab").write_bytes(bytes(24 * MiB))
        assert worker("--mem", "16M") == (2, (
            f"--mem 16.0 MiB exceeds the share of {small} left to RAM tiers: 50% of 64.0 MiB "
            "= 32.0 MiB, 24.0 MiB of it taken by other cachefs tiers (`cachefs gc` removes "
            "orphaned ones); lower --mem or raise --shm-share"
        ))  # fmt: skip
        shutil.rmtree(other)
        (small / "other-data").write_bytes(bytes(40 * MiB))  # not ours, but it takes room
        code, message = worker("--mem", "32M", "--shm-share", "100")
        assert code == 1 and re.fullmatch(
            rf"--mem 32.0 MiB exceeds the free space of {small} \(2\d.\d MiB\)", message
        ), message
        assert os.listdir(small) == ["other-data"]
    finally:
        subprocess.run(["umount", str(small)], check=False)
