"""The short-circuit reader's record of what it served, sent to the workers as hints."""

from __future__ import annotations

from cachefs.shortcircuit import TOUCHED_MAX, ShortCircuit


def test_hints_are_bounded_per_worker_taken_once_and_dropped_for_departed_workers():
    sc = ShortCircuit(enabled=True)
    keys = [i.to_bytes(16, "big") for i in range(TOUCHED_MAX + 50)]
    sc.note_served("w1", "ds", keys[:10], 1000)
    sc.note_served("w1", "ds", keys, 24)  # more keys than kept: the extras are dropped
    sc.note_served("w1", "other", keys[:1], 5)
    sc.note_served("w2", "ds", keys[:3], 7)
    taken = sc.take_touched()
    assert taken["w1"][0] == {"ds": 1024, "other": 5}
    assert len(taken["w1"][1]) == TOUCHED_MAX and set(taken["w1"][1]) <= set(keys)
    assert taken["w2"][0] == {"ds": 7} and set(taken["w2"][1]) == set(keys[:3])
    assert sc.take_touched() == {}

    sc.note_served("w1", "ds", keys[:2], 2)
    sc.note_served("w2", "ds", keys[:2], 2)
    sc.refresh({"w2": {}})  # w1 left the membership
    assert list(sc.take_touched()) == ["w2"]
