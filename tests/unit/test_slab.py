"""SlabAllocator: size classes, placement, free/claim/rebalance, byte accounting, efficiency."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachefs.worker.slab import SlabAllocator, Slot, make_class_sizes

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BLOCK = 4 * MiB


# --- size classes ------------------------------------------------------------------------


@pytest.mark.parametrize("align", [512, 4096])
@pytest.mark.parametrize("growth", [1.01, 1.08, 1.25])
def test_class_sizes_geometric_aligned_and_capped(growth: float, align: int) -> None:
    sizes = make_class_sizes(4 * KiB, BLOCK, growth, align)
    assert sizes[0] == 4 * KiB
    assert sizes[-1] == BLOCK
    assert all(s % align == 0 for s in sizes)
    for prev, nxt in zip(sizes, sizes[1:], strict=False):
        assert nxt > prev
        # One align step, or growth rounded up to align: never a bigger jump.
        assert nxt <= max(prev + align, -(-math.ceil(prev * growth) // align) * align)
        if prev >= 16 * align:  # past the linear region the ratio is growth (+ rounding)
            assert nxt / prev <= growth + align / prev


def test_default_classes() -> None:
    a = SlabAllocator(GiB)
    assert a.class_sizes == make_class_sizes(4096, BLOCK, 1.08, 4096)
    assert a.class_sizes[-1] == BLOCK
    assert len(a.class_sizes) == 65
    assert all(s % 4096 == 0 for s in a.class_sizes)


@pytest.mark.parametrize("growth", [1.0, 0.9, 1.26, 2.0])
def test_growth_bounds(growth: float) -> None:
    with pytest.raises(ValueError, match="growth"):
        SlabAllocator(GiB, growth=growth)
    SlabAllocator(GiB, growth=1.25)


def test_class_for_picks_smallest_fit() -> None:
    a = SlabAllocator(GiB)
    assert a.class_for(0) == 0
    assert a.class_for(1) == 0
    for i, size in enumerate(a.class_sizes):
        assert a.class_for(size) == i
        assert a.class_for(size - 1) == (i if i == 0 or a.class_sizes[i - 1] < size - 1 else i - 1)
        if i + 1 < len(a.class_sizes):
            assert a.class_for(size + 1) == i + 1
    with pytest.raises(ValueError):
        a.class_for(BLOCK + 1)
    with pytest.raises(ValueError):
        a.class_for(-1)
    with pytest.raises(ValueError):
        a.allocate(BLOCK + 1)


# --- construction --------------------------------------------------------------------------


def test_capacity_rounds_down_to_whole_slabs() -> None:
    a = SlabAllocator(3 * BLOCK + 12345, slab_size=BLOCK)
    assert a.slab_count == 3
    assert a.capacity == 3 * BLOCK
    assert a.unassigned_slabs == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity": 64 * MiB - 1},
        {"capacity": GiB, "slab_size": 2 * MiB},  # smaller than max_object
        {"capacity": GiB, "slab_size": BLOCK + 100},  # not aligned
        {"capacity": GiB, "align": 3000},
        {"capacity": GiB, "max_object": BLOCK + 512},  # last class would be unaligned
        {"capacity": GiB, "min_slot": 0},
    ],
)
def test_bad_geometry_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SlabAllocator(**kwargs)


def test_one_tib_constructs_quickly() -> None:
    t0 = time.perf_counter()
    a = SlabAllocator(TiB)
    slot = a.allocate(48_000)
    elapsed = time.perf_counter() - t0
    assert a.slab_count == 16384
    assert slot is not None and slot.slab == 0 and slot.offset == 0
    a.check_invariants()
    assert elapsed < 0.5, elapsed


# --- allocate / free / claim --------------------------------------------------------------


def test_allocate_places_slots_and_accounts() -> None:
    a = SlabAllocator(GiB)
    s1 = a.allocate(5000)
    s2 = a.allocate(5000)
    assert s1 is not None and s2 is not None
    assert s1.capacity == 8192 and s1.size_class == 1
    assert (s1.slab, s1.index, s1.offset) == (0, 0, 0)
    assert (s2.slab, s2.index, s2.offset) == (0, 1, 8192)
    s3 = a.allocate(BLOCK)
    assert s3 is not None and s3.slab == 1 and s3.offset == a.slab_size
    assert a.stored_bytes == 10000 + BLOCK
    assert a.allocated_bytes == 2 * 8192 + BLOCK
    assert a.efficiency() == pytest.approx((10000 + BLOCK) / (2 * 8192 + BLOCK))
    assert a.free(s1) == 5000
    assert a.stored_bytes == 5000 + BLOCK
    a.check_invariants()


def test_zero_length_object_takes_smallest_slot() -> None:
    a = SlabAllocator(GiB)
    s = a.allocate(0)
    assert s is not None and s.size_class == 0
    assert a.free(s) == 0
    a.check_invariants()


def test_empty_allocator_efficiency_is_one() -> None:
    assert SlabAllocator(GiB).efficiency() == 1.0


def test_double_free_and_foreign_slots_raise() -> None:
    a = SlabAllocator(GiB)
    s = a.allocate(100)
    assert s is not None
    a.free(s)
    with pytest.raises(ValueError, match="double free"):
        a.free(s)
    with pytest.raises(ValueError):  # unassigned slab
        a.free(Slot(3, 0, 0, 3 * a.slab_size, 4096))
    t = a.allocate(100)
    assert t is not None
    with pytest.raises(ValueError):  # inconsistent offset
        a.free(Slot(t.slab, t.index, t.size_class, t.offset + 4096, t.capacity))
    with pytest.raises(ValueError):  # wrong class for the slab
        a.free(Slot(t.slab, t.index, 1, t.offset, 8192))
    with pytest.raises(ValueError):  # beyond the tier
        a.free(Slot(a.slab_count, 0, 0, a.capacity, 4096))
    a.check_invariants()


def test_claim_restores_state() -> None:
    rng = random.Random(7)
    a = SlabAllocator(16 * BLOCK, slab_size=BLOCK)
    live: dict[Slot, int] = {}
    for _ in range(300):
        n = int(2 ** rng.uniform(0, 20))
        s = a.allocate(n)
        if s is not None:
            live[s] = n
    for s in rng.sample(sorted(live, key=lambda s: s.offset), 100):
        a.free(s)
        del live[s]

    b = SlabAllocator(16 * BLOCK, slab_size=BLOCK)
    items = list(live.items())
    rng.shuffle(items)
    for s, n in items:
        b.claim(s, n)
    b.check_invariants()
    assert (b.stored_bytes, b.allocated_bytes) == (a.stored_bytes, a.allocated_bytes)
    for slab in range(a.slab_count):
        assert b.slots_in_slab(slab) == [s for s in a.slots_in_slab(slab)]
        if a.slots_in_slab(slab):
            assert b.slab_class(slab) == a.slab_class(slab)
    # New allocations never land on a claimed slot.
    while (s := b.allocate(rng.choice([100, 5000, 70_000]))) is not None:
        assert s not in live
    b.check_invariants()


def test_claim_conflicts_raise() -> None:
    a = SlabAllocator(4 * BLOCK, slab_size=BLOCK)
    s = a.allocate(100)
    assert s is not None
    with pytest.raises(ValueError, match="in use"):
        a.claim(s)
    other = Slot(s.slab, 0, 1, s.slab * a.slab_size, 8192)  # slab 0 belongs to class 0
    with pytest.raises(ValueError, match="belongs to class"):
        a.claim(other)
    with pytest.raises(ValueError):
        a.claim(Slot(1, 0, 0, a.slab_size, 4096), length=4097)
    a.claim(Slot(2, 1, 1, 2 * a.slab_size + 8192, 8192), length=5000)
    assert a.slab_class(2) == 1
    assert a.stored_bytes == 5100
    a.check_invariants()


# --- slab movement ------------------------------------------------------------------------


def test_release_empty_slabs() -> None:
    a = SlabAllocator(4 * BLOCK, slab_size=BLOCK)
    small = [a.allocate(4096) for _ in range(1024)]  # exactly one slab of class 0
    big = a.allocate(BLOCK)
    assert all(small) and big is not None
    assert a.unassigned_slabs == 2
    assert a.release_empty_slabs() == 0
    for s in small:
        assert s is not None
        a.free(s)
    assert a.release_empty_slabs() == 1
    assert a.unassigned_slabs == 3
    assert a.slabs_of(0) == 0
    a.check_invariants()


def test_rebalance_moves_a_slab_to_the_needy_class() -> None:
    a = SlabAllocator(4 * BLOCK, slab_size=BLOCK)
    live = []
    while (s := a.allocate(4096)) is not None:
        live.append(s)
    assert a.slabs_of(0) == 4 and len(live) == 4 * 1024
    assert a.allocate(BLOCK) is None
    victim = a.rebalance_victim(BLOCK)
    assert victim is not None and a.slab_class(victim) == 0
    evicted = a.slots_in_slab(victim)
    assert len(evicted) == 1024
    for s in evicted:
        a.free(s)
    a.reassign(victim, a.class_for(BLOCK))
    s = a.allocate(BLOCK)
    assert s is not None and s.slab == victim
    a.check_invariants()


def test_rebalance_victim_none_when_the_class_owns_every_slab() -> None:
    a = SlabAllocator(2 * BLOCK, slab_size=BLOCK)
    while a.allocate(1) is not None:
        pass
    assert a.slabs_of(0) == 2
    assert a.rebalance_victim(1) is None  # only class 0 has slabs: evict within the class
    assert a.rebalance_victim(BLOCK) is not None


def test_rebalance_prefers_empty_then_slack_and_spares_last_slab() -> None:
    a = SlabAllocator(4 * BLOCK, slab_size=BLOCK)
    c_small, c_mid = 0, a.class_for(100_000)
    assert a.allocate(BLOCK) is not None  # the 4 MiB class: its only slab
    mids = [a.allocate(100_000) for _ in range(2 * a.slots_per_slab[c_mid])]  # 2 full slabs
    smalls = [a.allocate(1) for _ in range(a.slots_per_slab[c_small])]  # 1 full slab
    assert all(mids) and all(smalls) and a.unassigned_slabs == 0
    assert a.allocate(300_000) is None

    # Tight everywhere: the class with two slabs gives, not a class's last slab.
    victim = a.rebalance_victim(300_000)
    assert victim is not None and a.slab_class(victim) == c_mid

    # Slack: free most of a mid slab -> that slab (fewest used slots) is chosen.
    second = [s for s in mids if s is not None and s.slab == mids[-1].slab]
    for s in second[1:]:
        a.free(s)
    assert a.rebalance_victim(300_000) == second[0].slab

    # An empty slab beats everything, even a class's last one when nothing else is empty.
    for s in smalls:
        assert s is not None
        a.free(s)
    empty_slab = smalls[0].slab
    assert a.rebalance_victim(300_000) == empty_slab
    assert a.rebalance_victim(1) is None  # class 0 has free slots: no rebalance needed
    a.check_invariants()


def test_reassign_requires_empty_slab() -> None:
    a = SlabAllocator(2 * BLOCK, slab_size=BLOCK)
    s = a.allocate(10)
    assert s is not None
    with pytest.raises(ValueError, match="used slots"):
        a.reassign(s.slab, 5)
    a.free(s)
    a.reassign(s.slab, 5)
    assert a.slab_class(s.slab) == 5
    a.reassign(1, 7)  # an unassigned slab can be assigned directly
    assert a.slab_class(1) == 7 and a.unassigned_slabs == 0
    with pytest.raises(ValueError):
        a.reassign(2, 0)
    with pytest.raises(ValueError):
        a.reassign(0, len(a.class_sizes))
    a.check_invariants()


def test_tail_waste_is_accounted() -> None:
    a = SlabAllocator(2 * BLOCK, slab_size=BLOCK)
    s = a.allocate(3 * MiB)  # one slot per 4 MiB slab; the rest of the slab is tail
    assert s is not None
    assert a.tail_waste_bytes == BLOCK - s.capacity
    assert a.free_slot_bytes == 0
    assert a.allocated_bytes + a.tail_waste_bytes + a.slab_size == a.capacity
    a.check_invariants()


# --- efficiency ---------------------------------------------------------------------------


def _fill_lognormal(a: SlabAllocator, seed: int) -> None:
    """Allocate a log-normal mix (median 48 KB, sigma 0.8, capped at 4 MiB) until full.

    Full = 200 refusals in a row: refused classes are skipped so the others fill up.
    """
    rng = random.Random(seed)
    mu = math.log(48_000)
    refusals = 0
    while refusals < 200:
        n = min(int(rng.lognormvariate(mu, 0.8)), BLOCK)
        refusals = refusals + 1 if a.allocate(n) is None else 0


def test_efficiency_lognormal_mix() -> None:
    results = {}
    for align in (512, 4096):
        a = SlabAllocator(2 * GiB, align=align)
        _fill_lognormal(a, seed=42)
        a.check_invariants()
        results[align] = a
        print(
            f"\nslab efficiency align={align}: stored/allocated={a.efficiency():.4f} "
            f"stored/capacity={a.stored_bytes / a.capacity:.4f} "
            f"classes={len(a.class_sizes)}"
        )
    assert results[4096].efficiency() >= 0.90
    assert results[512].efficiency() >= 0.90


# --- stateful model -----------------------------------------------------------------------

lengths = st.floats(min_value=0.0, max_value=22.0).map(lambda e: min(int(2**e), BLOCK))


class SlabMachine(RuleBasedStateMachine):
    """Random allocate/free/claim/release/rebalance against a dict of live slots."""

    def __init__(self) -> None:
        super().__init__()
        self.a: SlabAllocator
        self.live: dict[Slot, int] = {}
        self.freed: set[Slot] = set()

    @initialize(slabs=st.integers(min_value=4, max_value=16))
    def setup(self, slabs: int) -> None:
        self.a = SlabAllocator(slabs * BLOCK + 1000, slab_size=BLOCK)

    def _expect_refusal_is_justified(self, length: int) -> None:
        c = self.a.class_for(length)
        assert self.a.free_slots(c) == 0
        assert self.a.unassigned_slabs == 0

    def _record(self, slot: Slot, length: int) -> None:
        c = self.a.class_for(length)
        assert slot.size_class == c
        assert slot.capacity == self.a.class_sizes[c] >= length
        assert slot not in self.live
        self.live[slot] = length
        self.freed.discard(slot)

    def _sample(self, data: st.DataObject, slots: set[Slot] | dict[Slot, int]) -> Slot:
        return data.draw(st.sampled_from(sorted(slots, key=lambda s: s.offset)))

    @rule(length=lengths)
    def allocate(self, length: int) -> None:
        slot = self.a.allocate(length)
        if slot is None:
            event("allocate refused")
            self._expect_refusal_is_justified(length)
        else:
            self._record(slot, length)

    @rule(length=lengths, count=st.integers(1, 1200))
    def fill(self, length: int, count: int) -> None:
        """Many objects of one class: drives the tier to refusals and rebalancing."""
        for _ in range(count):
            slot = self.a.allocate(length)
            if slot is None:
                event("fill refused")
                self._expect_refusal_is_justified(length)
                return
            self._record(slot, length)

    @rule(batch=st.lists(lengths, min_size=1, max_size=40))
    def burst(self, batch: list[int]) -> None:
        for length in batch:
            self.allocate(length)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 500))
    def free_many(self, data: st.DataObject, count: int) -> None:
        """Free a random subset, as a batch eviction does."""
        rng = random.Random(data.draw(st.integers(0, 2**16)))
        slots = sorted(self.live, key=lambda s: s.offset)
        for slot in rng.sample(slots, min(count, len(slots))):
            assert self.a.free(slot) == self.live.pop(slot)
            self.freed.add(slot)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot = self._sample(data, self.live)
        assert self.a.free(slot) == self.live.pop(slot)
        self.freed.add(slot)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        slot = self._sample(data, self.freed)
        with pytest.raises(ValueError):
            self.a.free(slot)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def claim_live_slot_conflicts(self, data: st.DataObject) -> None:
        slot = self._sample(data, self.live)
        with pytest.raises(ValueError):
            self.a.claim(slot)

    @rule(seed=st.integers(0, 2**16))
    def restart(self, seed: int) -> None:
        """Rebuild from the 'persisted index' in a random order, as after a worker restart."""
        old = self.a
        new = SlabAllocator(old.capacity, slab_size=old.slab_size)
        items = list(self.live.items())
        random.Random(seed).shuffle(items)
        for slot, length in items:
            new.claim(slot, length)
        assert (new.stored_bytes, new.allocated_bytes) == (old.stored_bytes, old.allocated_bytes)
        self.a = new

    @rule()
    def release_empty_slabs(self) -> None:
        before = self.a.unassigned_slabs
        empty = [
            s
            for s in range(self.a.slab_count)
            if self.a.slab_class(s) is not None and not self.a.slots_in_slab(s)
        ]
        event(f"released empty slabs: {min(len(empty), 2)}")
        assert self.a.release_empty_slabs() == len(empty)
        assert self.a.unassigned_slabs == before + len(empty)
        assert all(self.a.slab_class(s) is None for s in empty)

    @rule(length=lengths)
    def rebalance(self, length: int) -> None:
        """The store's path when a class is full: evict a victim slab, re-carve, retry."""
        slot = self.a.allocate(length)
        if slot is not None:
            self._record(slot, length)
            return
        self._expect_refusal_is_justified(length)
        c = self.a.class_for(length)
        victim = self.a.rebalance_victim(length)
        event(f"rebalance victim {'none' if victim is None else 'found'}")
        if victim is None:
            others = [d for d in range(len(self.a.class_sizes)) if d != c and self.a.slabs_of(d)]
            assert not others
            return
        donor = self.a.slab_class(victim)
        assert donor is not None and donor != c
        in_slab = self.a.slots_in_slab(victim)
        assert set(in_slab) == {s for s in self.live if s.slab == victim}
        if self.a.slabs_of(donor) == 1 and in_slab:
            # A class's last slab is only emptied by eviction when no other class has two.
            assert all(self.a.slabs_of(d) <= 1 for d in range(len(self.a.class_sizes)) if d != c)
        for s in in_slab:
            assert self.a.free(s) == self.live.pop(s)
            self.freed.add(s)
        self.a.reassign(victim, c)
        slot = self.a.allocate(length)
        assert slot is not None and slot.slab == victim
        self._record(slot, length)

    @invariant()
    def consistent(self) -> None:
        a = self.a
        a.check_invariants()
        # Independent checks from the model: ranges disjoint and inside their slab / the tier.
        end = 0
        for s in sorted(self.live, key=lambda s: s.offset):
            assert s.offset >= end, "overlapping slots"
            end = s.offset + s.capacity
            assert s.offset // a.slab_size == s.slab
            assert end <= (s.slab + 1) * a.slab_size <= a.capacity
        assert a.stored_bytes == sum(self.live.values())
        allocated = sum(s.capacity for s in self.live)
        assert a.allocated_bytes == allocated
        assert a.stored_bytes <= a.allocated_bytes
        # Every byte of the tier: used slots + free slots + unassigned slabs + slab tails.
        free_bytes = tail = unassigned = 0
        used_per_slab: dict[int, int] = {}
        for s in self.live:
            used_per_slab[s.slab] = used_per_slab.get(s.slab, 0) + 1
        for slab in range(a.slab_count):
            c = a.slab_class(slab)
            if c is None:
                assert slab not in used_per_slab
                unassigned += a.slab_size
                continue
            size = a.class_sizes[c]
            n = a.slab_size // size
            free_bytes += (n - used_per_slab.get(slab, 0)) * size
            tail += a.slab_size - n * size
        assert allocated + free_bytes + unassigned + tail == a.capacity
        assert (free_bytes, tail) == (a.free_slot_bytes, a.tail_waste_bytes)


TestSlabMachine = SlabMachine.TestCase
TestSlabMachine.settings = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
