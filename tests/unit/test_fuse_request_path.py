"""The FUSE request path's pure parts: the deadline watchdog, lock-free op stats, readahead."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from cachefs.fuse.deadlines import Watchdog
from cachefs.fuse.mount import mount_device
from cachefs.metrics import FuseOpStats


class FakeScope:
    def __init__(self):
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


def test_watchdog_cancels_only_ops_past_the_deadline_once():
    dog = Watchdog(10.0)
    old, mid, new = FakeScope(), FakeScope(), FakeScope()
    dog.inflight.update({old: 0.0, mid: 4.0, new: 9.0})
    assert dog.expire(5.0) == 5.0  # nothing due; the oldest expires at 10
    assert dog.expire(14.0) == pytest.approx(5.0)  # old and mid due; new expires at 19
    assert (old.cancelled, mid.cancelled, new.cancelled) == (1, 1, 0)
    assert list(dog.inflight) == [new]
    assert dog.expire(15.0) == pytest.approx(4.0)  # cancelled ops are not cancelled again
    assert old.cancelled == 1
    del dog.inflight[new]  # the op finished
    assert dog.expire(100.0) == 10.0  # idle: a new op cannot expire sooner


def test_watchdog_task_cancels_a_stuck_op_and_leaves_a_quick_one():
    async def main():
        dog = Watchdog(0.2)
        outcomes = {}

        async def op(name, seconds):
            with trio.CancelScope() as scope:
                dog.inflight[scope] = dog.clock()
                await trio.sleep(seconds)
            dog.inflight.pop(scope, None)
            outcomes[name] = "timed out" if scope.cancelled_caught else "done"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dog.run)
            async with trio.open_nursery() as ops:
                ops.start_soon(op, "stuck", 30)
                ops.start_soon(op, "quick", 0.05)
            nursery.cancel_scope.cancel()
        return outcomes

    t = time.monotonic()
    assert trio.run(main) == {"quick": "done", "stuck": "timed out"}
    assert time.monotonic() - t < 5


def test_op_stats_export_the_counter_and_histogram_prometheus_expects():
    stats = FuseOpStats(bounds=(0.001, 0.01))
    read = stats.op("read")
    assert stats.op("read") is read
    stats.op("lookup")  # known but never called: exported as zero
    for seconds in (0.0005, 0.001, 0.005, 3.0):
        read.observe(seconds)
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    assert 'cachefs_fuse_ops_total{op="read"} 4.0' in text
    assert 'cachefs_fuse_ops_total{op="lookup"} 0.0' in text
    types = {family.name: family.type for family in registry.collect()}
    assert types == {"cachefs_fuse_ops": "counter", "cachefs_fuse_op_seconds": "histogram"}
    # le is inclusive: 0.001 falls in the 0.001 bucket; buckets are cumulative
    assert 'cachefs_fuse_op_seconds_bucket{le="0.001",op="read"} 2.0' in text
    assert 'cachefs_fuse_op_seconds_bucket{le="0.01",op="read"} 3.0' in text
    assert 'cachefs_fuse_op_seconds_bucket{le="+Inf",op="read"} 4.0' in text
    assert 'cachefs_fuse_op_seconds_count{op="read"} 4.0' in text
    assert 'cachefs_fuse_op_seconds_sum{op="read"} 3.0065' in text


def test_mount_device_reads_the_last_mount_on_the_path_with_escapes():
    info = (
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "95 30 0:52 / /mnt/my\\040data rw,nosuid - fuse.cachefs cachefs ro\n"
        "96 30 0:60 / /mnt/x rw - fuse.cachefs cachefs ro\n"
        "97 96 0:61 / /mnt/x rw - fuse.cachefs cachefs ro\n"
    )
    assert mount_device(info, Path("/mnt/my data")) == "0:52"
    assert mount_device(info, Path("/mnt/x")) == "0:61"
    assert mount_device(info, Path("/mnt/none")) is None
