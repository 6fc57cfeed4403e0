"""`cachefs load` ends with what stayed cached, and says when the files are larger than the cache
(issue 17, item 2); `--check` prints the same counts. Real master and worker processes."""

from __future__ import annotations

import json
import re

from cachefs.cli.common import human_bytes
from tests.fuse.conftest import make_files
from tests.procs import add_dataset, run_cli, running_cluster

HELD = re.compile(r"(\d+)/(\d+) files (?:stayed )?cached \([\d.]+%\), (.+?) of (.+?) \(")
NOT_KEPT = 3  # cachefs.cli.jobs.EXIT_NOT_KEPT


def cli(master, *args):
    return run_cli(*args, "--master", master.address, timeout=300)


def held(line: str) -> tuple:
    """(cached files, files, cached bytes, bytes) as a summary or a check prints them."""
    match = HELD.search(line)
    assert match, line
    return match.groups()


def last_job(master) -> dict:
    result = cli(master, "status", "--json")
    assert result.returncode == 0, result.stderr
    return max(json.loads(result.stdout)["jobs"], key=lambda job: job["id"])


def test_a_dataset_that_fits_stays_cached_and_the_load_says_so(tmp_path):
    with running_cluster(tmp_path, workers=1, mem="64M") as (master, _):
        source = tmp_path / "small"
        digests = make_files(source, 300, max_size=16_384, seed=5)  # ~2.4 MB
        total = sum((source / rel).stat().st_size for rel in digests)
        add_dataset(master, "small", source)

        loaded = cli(master, "load", "small")
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        size = human_bytes(total)
        assert "300/300 files" in loaded.stdout and "0 failed" in loaded.stdout
        assert f"; 300/300 files stayed cached (100.0%), {size} of {size} (100.0%)" in (
            loaded.stdout
        )
        assert "larger than the cache" not in loaded.stdout and "evicted" not in loaded.stdout
        check = cli(master, "load", "small", "--check")
        assert check.returncode == 0, check.stderr
        assert (
            check.stdout.strip()
            == f"small: 300/300 files cached (100.0%), {size} of {size} (100.0%)"
        )

        kept = last_job(master)["kept"]  # `status --json` carries the job's holdings
        assert kept["cached_files"] == kept["files"] == 300
        assert kept["cached_bytes"] == kept["bytes"] == kept["need_bytes"] == total
        assert kept["capacity_bytes"] == 64 << 20 and kept["workers"] == 1
        assert kept["over"] is None and kept["whole"] is True


def test_a_dataset_larger_than_the_cache_is_reported_with_what_stayed(tmp_path):
    with running_cluster(tmp_path, workers=1, mem="16M") as (master, _):
        source = tmp_path / "big"
        digests = make_files(source, 280, max_size=400_000, seed=6)
        total = sum((source / rel).stat().st_size for rel in digests)
        assert 3 * (16 << 20) < total < 4 * (16 << 20)  # 3-4x the worker's RAM tier
        add_dataset(master, "big", source)

        before = cli(master, "load", "big", "--check")  # a check knows before any load
        assert before.returncode == 0, before.stderr
        assert "the dataset is larger than the cache (16.0 MiB over 1 worker)" in before.stdout

        loaded = cli(master, "load", "big")
        out = loaded.stdout
        # Everything was fetched, not everything kept: the warning exit status, not 1.
        assert loaded.returncode == NOT_KEPT, out + loaded.stderr
        assert "280/280 files" in out and "0 failed" in out, out
        assert len(out.strip().splitlines()) == 1, out  # one summary line
        assert (
            ": the dataset is larger than the cache (16.0 MiB over 1 worker); "
            "raise --mem/--disk or add workers"
        ) in out, out
        kept_files, files, kept_bytes, size = held(out.split("; ", 1)[1])
        assert int(files) == 280 and int(kept_files) < 280 and size == human_bytes(total)

        check = cli(master, "load", "big", "--check")
        assert check.returncode == 0, check.stderr
        assert held(check.stdout) == (kept_files, files, kept_bytes, size)  # the same counts
        assert "the dataset is larger than the cache (16.0 MiB over 1 worker)" in check.stdout

        kept = last_job(master)["kept"]
        assert kept["files"] == 280 and kept["bytes"] == total == kept["need_bytes"]
        assert kept["cached_files"] == int(kept_files)
        assert human_bytes(kept["cached_bytes"]) == kept_bytes
        assert kept["capacity_bytes"] == 16 << 20 and kept["workers"] == 1

        # A part of it that fits is not blamed on the cache.
        part = cli(master, "load", "big", "c000/v00000", "--check")
        assert part.returncode == 0 and "larger" not in part.stdout, part.stdout
        assert "/10 files cached" in part.stdout
        # Asked for more than fits, by paths: the same warning, about those files.
        paths = cli(master, "load", "big", "c000", "--check")
        assert "the files asked for are larger than the cache" in paths.stdout, paths.stdout
