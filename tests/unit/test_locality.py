"""Pure parts of short-circuit reads: the same-host decision and where an index record points."""

import random

from cachefs.locality import host_identity, is_local, make_token
from cachefs.master.registry import WorkerRegistry
from cachefs.worker.extents import PAGE, ExtentAllocator
from cachefs.worker.index import extent_of

MINE = {"boot_id": "b0", "netns": 4026531840}
TOKEN = {**MINE, "index": "/s/index.lmdb", "tiers": {"mem": "/dev/shm/cachefs-x/mem.slab"}}


def test_same_boot_and_network_namespace_is_local():
    assert is_local(TOKEN, MINE)


def test_another_boot_or_namespace_or_a_bad_token_is_not_local():
    assert not is_local({**TOKEN, "boot_id": "b1"}, MINE)  # another host (or a reboot)
    assert not is_local({**TOKEN, "netns": 1}, MINE)  # another pod / emulated host
    assert not is_local(None, MINE)  # an older worker: no token
    assert not is_local({**TOKEN, "tiers": {}}, MINE)
    assert not is_local({**TOKEN, "tiers": {"mem": 3}}, MINE)
    assert not is_local({**TOKEN, "index": None}, MINE)
    # Unknown identities never match, even each other.
    unknown = {"boot_id": "", "netns": 0}
    assert not is_local({**TOKEN, **unknown}, unknown)


def test_a_workers_own_token_is_local_to_this_process():
    token = make_token("/s/index.lmdb", {"disk": "/d/disk.slab"})
    assert token["tiers"] == {"disk": "/d/disk.slab"}
    assert is_local(token, host_identity())


def test_extent_of_places_records_where_the_allocator_put_them():
    alloc = ExtentAllocator(64 << 20)
    rng = random.Random(3)
    for _ in range(500):
        extent = alloc.allocate(rng.choice([1, 4096, 4097, 48_000, 1 << 20, 4 << 20]))
        if extent is None:
            break
        assert extent_of(extent.start, extent.pages) == extent
        assert extent.offset == extent.start * PAGE and extent.capacity == extent.pages * PAGE


def test_registry_carries_the_token_and_a_changed_token_is_a_membership_change():
    registry = WorkerRegistry(liveness=10, clock=lambda: 0.0)
    e1 = registry.register("w1", "h:1", "node", {}, TOKEN)
    assert registry.live()[0].public()["locality"] == TOKEN
    assert registry.register("w1", "h:1", "node", {}, TOKEN) == e1
    assert registry.register("w1", "h:1", "node", {}, {**TOKEN, "netns": 7}) > e1
    registry.register("w2", "h:2", "node", {})  # an older worker: no token, no key
    assert "locality" not in registry.live()[1].public()
    restored = WorkerRegistry(clock=lambda: 0.0)
    restored.restore(registry.snapshot())
    assert restored.live()[0].locality == {**TOKEN, "netns": 7}
