"""A seeded rawframes-like training set and its manifest (sizes and checksums).

Directories of 10 frames (`class_CCC/video_VVVVV/img_0000F.jpg`), sizes log-normal: most frames
around a median of ~40 KB (from a few KB to a few hundred KB), and one file in LARGE_EVERY a
"large" one of a few MB, some above the 4 MiB block size of the cache. The content is seeded
pseudo-random bytes (incompressible), so two runs with the same flags make the same bytes.

The manifest maps each relative path to (size, xxh3_64 of the content); every benchmark reader
checks what it read against it, so a wrong byte anywhere fails the run.

    python benchmarks/dataset.py OUT_DIR [--files 20000] [--seed 1]   # ~1.3 GiB by default

writes OUT_DIR/data/... and OUT_DIR/manifest.json (and reuses them when the flags match).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

MiB = 1 << 20
FRAMES_PER_DIR = 10
VIDEOS_PER_CLASS = 100

# relative path -> (size, xxh3_64 of the content)
Manifest = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Shape:
    """The size distribution; the defaults give ~69 KB per file (20,000 files = ~1.3 GiB)."""

    files: int = 20_000
    seed: int = 1
    median: int = 40_000  # frames: log-normal, median ~40 KB ...
    sigma: float = 0.8  # ... 95 % between ~8 KB and ~190 KB
    min_size: int = 1024
    large_every: int = 200  # one file in this many is "large": a few MB
    large_median: int = 2_500_000
    large_sigma: float = 0.5
    large_cap: int = 8 * MiB

    def size(self, rng: random.Random) -> int:
        if self.large_every and rng.randrange(self.large_every) == 0:
            size = rng.lognormvariate(math.log(self.large_median), self.large_sigma)
            return min(int(size), self.large_cap)
        size = int(rng.lognormvariate(math.log(self.median), self.sigma))
        return max(self.min_size, size)


def rel_path(i: int) -> str:
    video = i // FRAMES_PER_DIR
    return (
        f"class_{video // VIDEOS_PER_CLASS:03d}/video_{video:05d}/"
        f"img_{i % FRAMES_PER_DIR + 1:05d}.jpg"
    )


def make_dataset(root: Path, shape: Shape) -> Manifest:
    """Writes `shape.files` seeded frames under `root`; returns the manifest."""
    rng = random.Random(shape.seed)
    manifest: Manifest = {}
    for i in range(shape.files):
        rel = rel_path(i)
        data = rng.randbytes(shape.size(rng))
        path = root / rel
        if i % FRAMES_PER_DIR == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest[rel] = (len(data), xxhash.xxh3_64_intdigest(data))
    return manifest


def save_manifest(path: Path, shape: Shape, manifest: Manifest) -> None:
    path.write_text(json.dumps({"shape": asdict(shape), "files": manifest}))


def load_manifest(path: Path) -> tuple[Shape, Manifest]:
    doc = json.loads(path.read_text())
    return Shape(**doc["shape"]), {rel: (s, d) for rel, (s, d) in doc["files"].items()}


def ensure_dataset(out: Path, shape: Shape) -> tuple[Path, Manifest]:
    """OUT/data and its manifest: reused if OUT/manifest.json has the same shape, else made."""
    data, manifest_path = out / "data", out / "manifest.json"
    if manifest_path.exists():
        try:
            old_shape, manifest = load_manifest(manifest_path)
        except (ValueError, KeyError, TypeError):
            old_shape, manifest = None, {}
        if old_shape == shape and _looks_complete(data, manifest):
            return data, manifest
        manifest_path.unlink()
    shutil.rmtree(data, ignore_errors=True)
    manifest = make_dataset(data, shape)
    save_manifest(manifest_path, shape, manifest)  # written last: its presence means complete
    return data, manifest


def _looks_complete(root: Path, manifest: Manifest) -> bool:
    """Cheap check (sizes of a sample); every reader verifies all content anyway."""
    sample = list(manifest.items())[:: max(1, len(manifest) // 200)]
    try:
        return all((root / rel).stat().st_size == size for rel, (size, _) in sample)
    except OSError:
        return False


def describe(manifest: Manifest) -> dict:
    sizes = sorted(size for size, _ in manifest.values())
    return {
        "files": len(sizes),
        "bytes": sum(sizes),
        "dirs": len({rel.rsplit("/", 1)[0] for rel in manifest}),
        "median": sizes[len(sizes) // 2] if sizes else 0,
        "min": sizes[0] if sizes else 0,
        "max": sizes[-1] if sizes else 0,
        "above_4mib": sum(1 for s in sizes if s > 4 * MiB),
    }


def add_shape_arguments(parser: argparse.ArgumentParser, files: int | None = None) -> None:
    d = Shape()
    parser.add_argument("--files", type=int, default=files, help=f"files (default {d.files:,})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--median-kb", type=float, default=d.median / 1000, help="frame median")
    parser.add_argument("--sigma", type=float, default=d.sigma, help="frame log-normal sigma")
    parser.add_argument(
        "--large-every", type=int, default=d.large_every, help="one large file in N (0: none)"
    )
    parser.add_argument("--large-median-mb", type=float, default=d.large_median / 1e6)
    parser.add_argument("--large-cap-mib", type=float, default=d.large_cap / MiB)


def shape_from(args: argparse.Namespace, files: int) -> Shape:
    return Shape(
        files=files,
        seed=args.seed,
        median=int(args.median_kb * 1000),
        sigma=args.sigma,
        large_every=args.large_every,
        large_median=int(args.large_median_mb * 1e6),
        large_cap=int(args.large_cap_mib * MiB),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="writes OUT/data/ and OUT/manifest.json")
    add_shape_arguments(parser, files=Shape().files)
    args = parser.parse_args()
    started = time.perf_counter()
    root, manifest = ensure_dataset(args.out, shape_from(args, args.files))
    info = describe(manifest)
    print(
        f"{root}: {info['files']:,} files in {info['dirs']:,} directories, "
        f"{info['bytes'] / MiB:,.0f} MiB (median {info['median'] / 1000:.0f} KB, "
        f"{info['min'] / 1000:.1f} KB to {info['max'] / MiB:.1f} MiB, "
        f"{info['above_4mib']} above 4 MiB) in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
