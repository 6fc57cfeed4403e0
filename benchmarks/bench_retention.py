"""What a cache keeps (#17): live bytes of full tiers, and hit ratios of the eviction policies.

    python benchmarks/bench_retention.py [--sizes 16,64,256,1024] [--results benchmarks/results.md]

1. Live bytes: a worker's real BlockStore (worker/store.py) with one RAM tier of each size
   (MiB, in a private directory under /dev/shm) is offered rawframes-like objects
   (benchmarks/dataset.py's size mix, whole files up to the 4 MiB block) worth 4x its capacity;
   then the bytes its entries hold are compared with the capacity.
   The same offer to the extent allocator alone (worker/extents.py, what the store now uses)
   with plain LRU eviction until the object fits, simulated: the bytes live entries hold.
2. Hit ratios (bytes) of a real one-tier BlockStore (LRU, every miss filled), and LRU vs LRU
   with TinyLFU admission (worker/admission.py) simulated over a byte-sized cache with exact
   accounting (no allocator, so the policies alone are compared):
   - repeated epochs: a dataset 2x the cache, 5 epochs, each in a new random order;
   - Zipf: 100,000 accesses over a dataset 4x the cache, popularity ~ 1/rank^0.9.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dataset import Shape  # noqa: E402
from benchmarks.harness import machine  # noqa: E402
from benchmarks.results import replace_section, rerun_command  # noqa: E402
from cachefs.meta import BLOCK_SIZE  # noqa: E402
from cachefs.worker.admission import TinyLfu  # noqa: E402
from cachefs.worker.extents import ExtentAllocator  # noqa: E402
from cachefs.worker.store import BlockStore  # noqa: E402

MiB = 1 << 20


def sizes(count: int, seed: int) -> list[int]:
    shape, rng = Shape(files=count, seed=seed), random.Random(seed)
    return [min(shape.size(rng), BLOCK_SIZE) for _ in range(count)]


def key(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def live_bytes(capacity: int, seed: int = 1) -> dict:
    """Offers objects worth 4x `capacity` to a real BlockStore; what its entries then hold."""
    mix = sizes(100_000, seed)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as st:
        store = BlockStore(Path(st), mem_capacity=capacity, shm_dir=Path(shm), shm_share=100)
        try:
            offered = n = 0
            while offered < 4 * capacity:
                size = mix[n % len(mix)]
                store.put(key(n), bytes(size), "d")
                offered, n = offered + size, n + 1
            held = sum(loc.length for loc in store._locations.values())
            return {"capacity": capacity, "held": held, "entries": len(store._locations),
                    "offered": n}  # fmt: skip
        finally:
            store.close(remove={"mem"})


def extent_live_bytes(capacity: int, seed: int = 1) -> tuple[float, float]:
    """(held / capacity, evictions per put) of the extent allocator under LRU eviction."""
    mix = sizes(100_000, seed)
    alloc, lru = ExtentAllocator(capacity), OrderedDict()
    offered = n = evictions = 0
    while offered < 4 * capacity:
        size = mix[n % len(mix)]
        extent = alloc.allocate(size)
        while extent is None and lru:
            victim, _ = lru.popitem(last=False)[1]
            alloc.free(victim)
            evictions += 1
            extent = alloc.allocate(size)
        lru[n] = (extent, size)
        offered, n = offered + size, n + 1
    return sum(size for _, size in lru.values()) / capacity, evictions / n


def hit_ratio(capacity: int, item_sizes: list[int], accesses: list[int], admission: bool) -> float:
    """A byte-sized LRU cache (with TinyLFU admission or not) over `accesses`; bytes hit / read."""
    cache: OrderedDict[int, int] = OrderedDict()
    lfu = TinyLfu(max(1, capacity // 40_000)) if admission else None
    used = hit = read = 0
    for i in accesses:
        size = item_sizes[i]
        read += size
        if lfu is not None:
            lfu.record(key(i))
        if i in cache:
            cache.move_to_end(i)
            hit += size
            continue
        if size > capacity:
            continue
        victims, freed = [], 0
        for victim, victim_size in cache.items():  # coldest first
            if used - freed + size <= capacity:
                break
            victims.append(victim)
            freed += victim_size
        if lfu is not None and victims and not lfu.admit(key(i), [key(v) for v in victims]):
            continue
        for victim in victims:
            used -= cache.pop(victim)
        cache[i] = size
        used += size
    return hit / read


def store_hit_ratio(capacity: int, item_sizes: list[int], accesses: list[int]) -> float:
    """Bytes hit / read of a real BlockStore with one RAM tier of `capacity` (LRU)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory() as st:
        store = BlockStore(Path(st), mem_capacity=capacity, shm_dir=Path(shm), shm_share=100)
        try:
            hit = read = 0
            for i in accesses:
                size = item_sizes[i]
                read += size
                if store.get(key(i)) is not None:
                    hit += size
                else:
                    store.put(key(i), bytes(size), "d")
            return hit / read
        finally:
            store.close(remove={"mem"})


def workloads(capacity: int, seed: int = 2) -> dict[str, tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    mix = sizes(200_000, seed)
    out = {}
    # Repeated epochs over a dataset twice the cache, each epoch shuffled.
    n, total = 0, 0
    while total < 2 * capacity:
        total, n = total + mix[n], n + 1
    epochs = []
    for _ in range(5):
        order = list(range(n))
        rng.shuffle(order)
        epochs += order
    out["repeated epochs, dataset 2x the cache"] = (mix[:n], epochs)
    # Zipf over a dataset four times the cache.
    n, total = 0, 0
    while total < 4 * capacity:
        total, n = total + mix[n], n + 1
    weights = [1 / (rank + 1) ** 0.9 for rank in range(n)]
    out["Zipf 0.9, dataset 4x the cache"] = (mix[:n], rng.choices(range(n), weights, k=100_000))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="16,64,256,1024", help="tier sizes in MiB")
    p.add_argument("--policy-cache-mib", type=int, default=256)
    p.add_argument("--results", type=Path)
    args = p.parse_args()
    rows = []
    for mib in (int(s) for s in args.sizes.split(",")):
        r = live_bytes(mib * MiB)
        share = r["held"] / r["capacity"]
        extent_share, evictions = extent_live_bytes(mib * MiB)
        rows.append(f"| {mib} MiB | {r['held'] / MiB:,.1f} MiB | **{share:.1%}** "
                    f"| {r['entries']:,} of {r['offered']:,} | **{extent_share:.1%}** "
                    f"({evictions:.2f} evictions per put) |")  # fmt: skip
        print(rows[-1], flush=True)
    capacity = args.policy_cache_mib * MiB
    policy_rows = []
    for name, (item_sizes, accesses) in workloads(capacity).items():
        lru = hit_ratio(capacity, item_sizes, accesses, admission=False)
        lfu = hit_ratio(capacity, item_sizes, accesses, admission=True)
        real = store_hit_ratio(capacity, item_sizes, accesses)
        policy_rows.append(f"| {name} | {real:.1%} | {lru:.1%} | **{lfu:.1%}** |")
        print(policy_rows[-1], flush=True)
    text = "\n".join([
        f"`{rerun_command('benchmarks/bench_retention.py')}` on {machine()}.",
        "",
        "Live bytes: a real BlockStore with one RAM tier, offered rawframes-like objects worth 4x "
        "its capacity (target: >= 90% of the tier holds live entries).",
        "",
        "| RAM tier | BlockStore: bytes held | of capacity | entries kept of offered "
        "| extent allocator + LRU alone (simulated): of capacity |",
        "|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Hit ratios (bytes), a {args.policy_cache_mib} MiB cache: the real BlockStore (LRU), "
        "and LRU vs TinyLFU admission simulated with exact byte accounting:",
        "",
        "| workload | BlockStore (LRU) | simulated LRU | simulated LRU + TinyLFU admission |",
        "|---|---:|---:|---:|",
        *policy_rows,
    ]) + "\n"  # fmt: skip
    print(text)
    if args.results:
        replace_section(args.results, "Retention (#17)", text)


if __name__ == "__main__":
    main()
