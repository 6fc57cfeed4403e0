"""HedgePolicy: when a slow GET gets a second one (pure policy, no I/O)."""

from __future__ import annotations

import pytest

from cachefs.hedging import HedgePolicy


def test_no_hedge_until_enough_samples():
    policy = HedgePolicy(min_samples=5, window=10, floor=0.0)
    for _ in range(4):
        policy.record(0.01)
        assert policy.delay() is None
    policy.record(0.01)
    assert policy.delay() == pytest.approx(0.01)  # a steady store: its tail is its median


def test_delay_follows_the_tail_not_the_outliers_of_old():
    policy = HedgePolicy(quantile=0.9, median_multiple=4.0, floor=0.0, window=10, min_samples=10)
    for ms in range(1, 11):  # 1..10 ms
        policy.record(ms / 1000)
    assert policy.delay() == pytest.approx(0.010)  # the 90th percentile of 10 samples
    for _ in range(10):  # a window of fast answers pushes the slow ones out
        policy.record(0.002)
    assert policy.delay() == pytest.approx(0.002)


def test_floor_keeps_a_fast_store_from_doubling_requests():
    policy = HedgePolicy(floor=0.05, min_samples=3, window=3)
    for _ in range(3):
        policy.record(0.001)
    assert policy.delay() == 0.05


def test_common_stalls_are_hedged_after_a_multiple_of_the_median():
    policy = HedgePolicy(quantile=0.99, median_multiple=4.0, floor=0.0, window=100, min_samples=100)
    for i in range(100):
        policy.record(4.0 if i % 10 == 0 else 0.01)  # 10% of GETs stall 4 s
    assert policy.delay() == pytest.approx(0.04)  # not the 4 s the 99th percentile says


def test_a_slow_tail_below_the_cap_sets_the_delay():
    policy = HedgePolicy(quantile=0.99, median_multiple=4.0, floor=0.0, window=100, min_samples=100)
    for i in range(100):
        policy.record(0.03 if i % 50 == 0 else 0.01)  # 2% of GETs take 3x the usual
    assert policy.delay() == pytest.approx(0.03)


@pytest.mark.parametrize("kwargs", [{"quantile": 1.0}, {"min_samples": 0}, {"window": 5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="quantile"):
        HedgePolicy(**kwargs)


def test_hedges_stay_within_their_budget():
    policy = HedgePolicy(budget=0.05, burst=2.0)
    assert policy.take_hedge() and policy.take_hedge()  # the burst
    assert not policy.take_hedge()
    for _ in range(19):
        policy.started()
    assert not policy.take_hedge()  # 19 GETs earn 0.95 of a hedge
    policy.started()
    assert policy.take_hedge()  # the 20th: 1 hedge per 20 GETs, 5%
    for _ in range(1000):
        policy.started()
    assert sum(policy.take_hedge() for _ in range(10)) == 2  # a long quiet run: still the burst
