"""Worker membership rules, with a fake clock (the registry itself does no I/O)."""

from cachefs.master.registry import WorkerRegistry


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_register_heartbeat_expire_and_epochs():
    clock = Clock()
    registry = WorkerRegistry(liveness=10, clock=clock)
    first = registry.epoch
    e1 = registry.register("w1", "10.0.0.1:1", "node-a", {"mem": 1})
    e2 = registry.register("w2", "10.0.0.2:1", "node-b", {"mem": 1})
    assert first < e1 < e2
    assert [w.worker_id for w in registry.live()] == ["w1", "w2"]

    # Re-registering at the same address is not a membership change.
    assert registry.register("w1", "10.0.0.1:1", "node-a", {"mem": 2}) == e2

    clock.now += 8
    assert registry.heartbeat("w1", {"used": 5})
    clock.now += 5  # w2 silent for 13 s, w1 for 5 s
    assert registry.expire() == ["w2"]
    assert registry.epoch > e2
    assert [w.worker_id for w in registry.live()] == ["w1"]
    assert registry.live()[0].stats == {"used": 5}

    # An expired worker learns it must register again.
    assert not registry.heartbeat("w2", {})
    before = registry.epoch
    registry.unregister("w1")
    assert registry.epoch > before and registry.live() == []


def test_epoch_source_is_injectable():
    epochs = iter(range(41, 100))
    registry = WorkerRegistry(on_change=lambda: next(epochs))
    assert registry.epoch == 41
    assert registry.register("w", "h:1", "h", {}) == 42


def test_restored_members_live_until_they_miss_heartbeats():
    clock = Clock()
    before = WorkerRegistry(liveness=10, clock=clock)
    before.register("w1", "h1:1", "n1", {"mem": 1})
    before.register("w2", "h2:1", "n2", {"mem": 2})
    after = WorkerRegistry(liveness=10, clock=clock)  # a restarted master
    after.restore(before.snapshot())
    assert [w.address for w in after.live()] == ["h1:1", "h2:1"]
    assert after.heartbeat("w1", {})  # known: no re-registration needed
    clock.now += 11
    assert after.heartbeat("w1", {}) and after.expire() == ["w2"]
