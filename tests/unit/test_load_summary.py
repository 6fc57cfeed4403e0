"""The wording of a load's holdings (cachefs.cli.jobs.held_text): each reason the cache gives
for not holding every file, from holdings as the master reports them."""

from __future__ import annotations

from cachefs.cli.jobs import held_text

MIB = 1 << 20


def holdings(**changes) -> dict:
    base = {
        "files": 3500, "bytes": 243 * MIB, "cached_files": 412, "cached_bytes": 61 * MIB,
        "whole": True, "replicas": 1, "need_bytes": 243 * MIB,
        "workers": 1, "capacity_bytes": 64 * MIB, "over": None, "used_bytes": None,
    }  # fmt: skip
    return {**base, **changes}


def test_all_held_needs_no_reason():
    text = held_text(holdings(cached_files=3500, cached_bytes=243 * MIB), "stayed cached")
    assert text == "3500/3500 files stayed cached (100.0%), 243.0 MiB of 243.0 MiB (100.0%)"


def test_larger_than_the_cache():
    assert held_text(holdings(), "stayed cached") == (
        "412/3500 files stayed cached (11.8%), 61.0 MiB of 243.0 MiB (25.1%): the dataset is "
        "larger than the cache (64.0 MiB over 1 worker); raise --mem/--disk or add workers"
    )
    copies = holdings(replicas=2, need_bytes=486 * MIB, whole=False, workers=4,
                      capacity_bytes=256 * MIB)  # fmt: skip
    assert (
        "the files asked for (2 copies, 486.0 MiB) are larger than the cache (256.0 MiB "
        "over 4 workers)" in held_text(copies)
    )


def test_one_owners_share_larger_than_its_cache():
    over = {"worker": "48fa6f61c3a0", "host": "node-b", "bytes": 150 * MIB, "capacity": 128 * MIB}
    text = held_text(holdings(workers=2, capacity_bytes=320 * MIB, over=over))
    assert text.endswith(
        ": worker 48fa6f61c3a0's share (host node-b, 150.0 MiB) is larger than its cache "
        "(128.0 MiB); raise --mem/--disk or add workers"
    )


def test_fits_but_evicted_only_after_a_load_without_failures():
    fits = holdings(workers=4, capacity_bytes=1024 * MIB)
    assert ":" not in held_text(fits)  # a check: perhaps simply not loaded yet
    loaded = {**fits, "used_bytes": 900 * MIB}
    assert held_text(loaded).endswith(
        ": the rest was evicted (the cache: 1.0 GiB over 4 workers, 900.0 MiB of it in use); "
        "raise --mem/--disk or add workers"
    )
    assert ":" not in held_text(loaded, failed=3)  # the failures are the reason shown


def test_a_share_short_of_all_never_reads_100_percent():
    text = held_text(holdings(files=10_000, cached_files=9_999, cached_bytes=243 * MIB - 1))
    assert text.startswith("9999/10000 files cached (99.9%)") and "(99.9%)" in text
