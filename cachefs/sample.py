"""Makes a small rawframes-like sample dataset: directories of frames with log-normal sizes.

    python -m cachefs.sample DIR [--videos N] [--frames N] [--seed S]

The bytes are seeded pseudo-random, so a second run writes the same dataset.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def make_sample(root: Path, videos: int = 50, frames: int = 10, seed: int = 1) -> int:
    """Writes videos × frames files (median ~48 KB, capped at 4 MiB); returns the bytes written."""
    rng = random.Random(seed)
    total = 0
    for v in range(videos):
        folder = root / f"class_{v % 5:02d}" / f"video_{v:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            size = min(int(rng.lognormvariate(10.8, 0.8)), 4 << 20)
            (folder / f"img_{f:05d}.jpg").write_bytes(rng.randbytes(size))
            total += size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description="make a rawframes-like sample dataset")
    parser.add_argument("root", type=Path)
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    total = make_sample(args.root, args.videos, args.frames, args.seed)
    print(f"wrote {args.videos * args.frames} files, {total / 2**20:.1f} MiB under {args.root}")


if __name__ == "__main__":
    main()
