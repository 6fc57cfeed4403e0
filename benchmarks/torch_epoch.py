"""One PyTorch DataLoader epoch over a dataset directory: file contents in batches, no model.

A map-style Dataset whose items are whole files, read and checked against the manifest (size +
xxh3_64) in the loader's worker processes; a batch is one uint8 tensor of the files' bytes
joined plus their lengths. The order is one seeded shuffle. The epoch is timed from creating
the loader's iterator (worker start-up included, as in training) to the last batch.

    python benchmarks/torch_epoch.py ROOT MANIFEST [--workers 4] [--batch 32] [--seed 2]
                                     [--unbuffered]

--unbuffered opens files with buffering=0 (docs/performance.md): Python's buffered open() asks
the kernel isatty() first, one more FUSE request per file.

--cachefs MASTER reads through the Python API instead (docs/python.md): ROOT is then the
dataset's name and the Dataset is cachefs.torch.CachefsDataset (its items checked the same
way); --order-hint W hands each epoch's order to the cluster (EpochPrefetchSampler, W files in
flight). --limit N reads only the first N files of the shuffled order.

Prints one JSON line: {"seconds", "first_batch_s", "files", "bytes"}. Exit status 3 (and the
message on stderr) if any file had the wrong content.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import xxhash
from torch.utils.data import DataLoader, Dataset

CONTENT_ERROR_EXIT = 3


class FileContentError(Exception):
    pass


class Frames(Dataset):
    def __init__(self, root: Path, files: list[tuple[str, int, int]], unbuffered: bool):
        self.root = root
        self.files = files
        self.buffering = 0 if unbuffered else -1

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> bytes:
        rel, size, digest = self.files[i]
        with open(self.root / rel, "rb", buffering=self.buffering) as f:
            data = f.read()  # unbuffered: FileIO.read() with no size reads to the end
        if len(data) != size or xxhash.xxh3_64_intdigest(data) != digest:
            raise FileContentError(f"{rel}: wrong content ({len(data)} bytes, expected {size})")
        return data


def checked(manifest_files: dict[str, tuple[int, int]]):
    """A CachefsDataset transform: the file's bytes, checked against the manifest."""

    def transform(rel: str, data: bytes) -> bytes:
        size, digest = manifest_files[rel]
        if len(data) != size or xxhash.xxh3_64_intdigest(data) != digest:
            raise FileContentError(f"{rel}: wrong content ({len(data)} bytes, expected {size})")
        return data

    return transform


def collate(items: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """(all bytes as one uint8 tensor, the length of each file)."""
    joined = bytearray(b"".join(items))
    return torch.frombuffer(joined, dtype=torch.uint8), torch.tensor([len(b) for b in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--unbuffered", action="store_true", help="open with buffering=0")
    parser.add_argument("--cachefs", metavar="MASTER", help="read ROOT (a dataset) via the API")
    parser.add_argument("--order-hint", type=int, default=0, metavar="W")
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    manifest = json.loads(args.manifest.read_text())["files"]
    files = [(rel, size, digest) for rel, (size, digest) in sorted(manifest.items())]
    order = list(range(len(files)))
    random.Random(args.seed).shuffle(order)
    if args.limit:
        order = order[: args.limit]
    expected = sum(files[i][1] for i in order)

    torch.set_num_threads(1)
    if args.cachefs:
        from cachefs.torch import CachefsDataset, EpochPrefetchSampler

        dataset = CachefsDataset(str(args.root), master=args.cachefs,
                                 transform=checked(dict(manifest.items())))  # fmt: skip
        assert dataset.paths == [rel for rel, _, _ in files], "the dataset is not the manifest"
        sampler = EpochPrefetchSampler(order, dataset, window=args.order_hint) \
            if args.order_hint else order  # fmt: skip
    else:
        dataset, sampler = Frames(args.root, files, args.unbuffered), order
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate,
    )
    count = total = 0
    first = None
    started = time.perf_counter()
    try:
        for data, lengths in loader:
            if first is None:
                first = time.perf_counter() - started
            if int(lengths.sum()) != data.numel():
                raise FileContentError("a batch lost bytes between the worker and the loop")
            count += len(lengths)
            total += data.numel()
    except FileContentError as exc:  # raised in this process (worker errors are re-raised)
        print(f"content error: {exc}", file=sys.stderr)
        sys.exit(CONTENT_ERROR_EXIT)
    seconds = time.perf_counter() - started
    if count != len(order) or total != expected:
        print(f"content error: {count} files / {total} bytes, expected {expected}", file=sys.stderr)
        sys.exit(CONTENT_ERROR_EXIT)
    print(json.dumps({"seconds": seconds, "first_batch_s": first, "files": count, "bytes": total}))


if __name__ == "__main__":
    main()
