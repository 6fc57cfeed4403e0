"""Per-dataset controls (issue 17 item 3), the pure parts: the master's validation, shares and
persisted book; the worker's parsing of what the master sends; the CLI's parsing and text."""

from __future__ import annotations

import math

import pytest

from cachefs.cli.datasets import _quota, _ttl, controls_text, duration_text
from cachefs.cli.jobs import shortfall
from cachefs.errors import InvalidArgument
from cachefs.master.controls import DEFAULTS, ControlBook, check_changes, worker_share
from cachefs.worker.controls import DEFAULT, Control, parse_controls

GiB = 1 << 30


class FakeMeta:
    """The two MetadataStore methods a ControlBook uses, over a dict."""

    def __init__(self):
        self.docs: dict = {}

    def get_meta(self, key):
        return self.docs.get(key)

    def set_meta(self, key, value):
        self.docs[key] = value


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"pinned": 1},
        {"pinned": None},
        {"quota_bytes": 0},
        {"quota_bytes": -5},
        {"quota_bytes": 1.5},
        {"quota_bytes": True},
        {"quota_bytes": "1G"},
        {"ttl_seconds": 0},
        {"ttl_seconds": -1},
        {"ttl_seconds": math.nan},
        {"ttl_seconds": math.inf},
        {"ttl_seconds": True},
        {"ttl_seconds": "2h"},
        {"colour": "red"},
        "pinned",
    ],
)
def test_the_master_refuses_bad_changes(changes):
    with pytest.raises(InvalidArgument):
        check_changes(changes)


def test_the_master_accepts_and_normalises_changes():
    assert check_changes({"pinned": True, "quota_bytes": GiB, "ttl_seconds": 7200}) == {
        "pinned": True,
        "quota_bytes": GiB,
        "ttl_seconds": 7200.0,
    }
    assert check_changes({"quota_bytes": None, "ttl_seconds": None}) == {
        "quota_bytes": None,
        "ttl_seconds": None,
    }


def test_a_quota_is_split_over_the_live_workers_rounding_up():
    assert worker_share(10, 1) == 10
    assert worker_share(10, 3) == 4
    assert worker_share(9, 3) == 3
    assert worker_share(10, 0) == 10  # no live worker yet: a newcomer takes all of it


def test_the_book_merges_persists_and_forgets():
    meta = FakeMeta()
    book = ControlBook(meta)
    assert book.get("frames") == DEFAULTS
    assert book.update("frames", {"pinned": True}) == {**DEFAULTS, "pinned": True}
    assert book.update("frames", {"quota_bytes": 4 * GiB, "ttl_seconds": 60}) == {
        "pinned": True,
        "quota_bytes": 4 * GiB,
        "ttl_seconds": 60.0,
    }
    # persisted: a new book (a restarted master) reads the same
    assert ControlBook(meta).get("frames") == book.get("frames")
    # only non-defaults are kept; clearing everything forgets the dataset
    book.update("frames", {"pinned": False, "quota_bytes": None})
    assert meta.docs["controls"] == {"frames": {"ttl_seconds": 60.0}}
    book.update("frames", {"ttl_seconds": None})
    assert meta.docs["controls"] == {}
    book.update("clips", {"pinned": True})
    book.forget("clips")
    assert ControlBook(meta).get("clips") == DEFAULTS


def test_what_workers_get_carries_their_share_and_a_growing_revision():
    book = ControlBook(FakeMeta())
    first = book.for_workers(2)
    book.update("frames", {"quota_bytes": 10 * GiB, "pinned": True})
    wire = book.for_workers(4)
    assert wire["instance"] == first["instance"]
    assert wire["revision"] > first["revision"]
    assert wire["datasets"] == {
        "frames": {"pinned": True, "quota_bytes": 10 * GiB // 4, "ttl_seconds": None}
    }
    assert ControlBook(FakeMeta()).instance != book.instance  # a restarted master


def test_the_worker_parses_what_the_master_sends():
    wire = {
        "a": {"pinned": True, "quota_bytes": None, "ttl_seconds": None},
        "b": {"pinned": False, "quota_bytes": 100, "ttl_seconds": 2},
        "c": {"pinned": False, "quota_bytes": None, "ttl_seconds": None},  # all defaults
    }
    assert parse_controls(wire) == {
        "a": Control(pinned=True),
        "b": Control(quota_bytes=100, ttl_seconds=2.0),
    }
    assert Control() == DEFAULT
    for bad in (
        [],
        {"a": []},
        {"a": {"pinned": "yes"}},
        {"a": {"quota_bytes": -1}},
        {"a": {"ttl_seconds": 0}},
        {"a": {"ttl_seconds": math.nan}},
    ):
        with pytest.raises(InvalidArgument):
            parse_controls(bad)


def test_the_cli_parses_sizes_durations_and_none():
    assert _quota("1G") == GiB
    assert _quota("512M") == 512 << 20
    assert _quota("none") is None and _quota("None") is None
    assert _ttl("2h") == 7200
    assert _ttl("90s") == 90
    assert _ttl("30") == 30
    assert _ttl("NONE") is None
    for text, message in (
        ("abc", "--quota: invalid size 'abc'"),
        ("0", "--quota must be a positive size"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            _quota(text)
    for text, message in (
        ("soon", "--ttl: invalid duration 'soon'"),
        ("0", "--ttl must be a positive duration"),
        ("-5m", "--ttl must be a positive duration"),
        ("nan", "--ttl must be a positive duration"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            _ttl(text)


def test_the_cli_shows_controls_in_one_short_clause():
    assert duration_text(7200) == "2h"
    assert duration_text(86400) == "1d"
    assert duration_text(90) == "90s"
    assert duration_text(120) == "2m"
    assert duration_text(1.5) == "1.5s"
    assert controls_text(DEFAULTS) == ""
    assert controls_text({"pinned": True, "quota_bytes": GiB, "ttl_seconds": 7200.0}) == (
        "pinned, quota 1.0 GiB, ttl 2h"
    )
    assert controls_text({"pinned": False, "quota_bytes": None, "ttl_seconds": 3.0}) == "ttl 3s"


def test_a_load_beyond_its_quota_names_the_quota_not_the_cache():
    held = {
        "files": 120, "cached_files": 38, "bytes": 12_000_000, "cached_bytes": 3_800_000,
        "whole": True, "replicas": 1, "need_bytes": 12_000_000, "workers": 1,
        "capacity_bytes": 16 << 20, "over": None, "used_bytes": 3_800_000,
        "quota_bytes": 4 << 20,
    }  # fmt: skip
    assert shortfall(held) == (
        "the dataset is larger than its quota (4.0 MiB); raise or clear it: "
        "cachefs dataset set NAME --quota SIZE|none"
    )
    part = {**held, "whole": False, "replicas": 2, "need_bytes": 24_000_000}
    assert shortfall(part).startswith(
        "the files asked for (2 copies, 22.9 MiB) are larger than the dataset's quota (4.0 MiB)"
    )
    roomy = {**held, "quota_bytes": 64 << 20}  # not the quota: the usual reasons
    assert shortfall(roomy).startswith("the rest was evicted")
    assert shortfall({**held, "quota_bytes": None}).startswith("the rest was evicted")
