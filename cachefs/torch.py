"""PyTorch datasets over a cachefs cluster, read through `cachefs.client` (no FUSE mount).

    from torch.utils.data import DataLoader, RandomSampler
    from cachefs.torch import CachefsDataset, EpochPrefetchSampler

    ds = CachefsDataset("frames", master="10.0.0.5:19470", paths="class_*/**/*.jpg",
                        transform=lambda path, data: (decode(data), label_of(path)))
    loader = DataLoader(ds, sampler=EpochPrefetchSampler(RandomSampler(ds), ds),
                        batch_size=32, num_workers=4)

The files and their attributes are listed once, at construction: an item is one read, no
metadata call. Forked DataLoader workers share the parent's `Client` (it opens its own
connections in each child); spawned ones unpickle the dataset without it and connect on their
first item. `EpochPrefetchSampler` hands each epoch's order to the cluster, whose workers fetch
ahead of the readers; the hint is sent from a thread and a failure is warned about once.

mmaction-style rawframes (a directory per video, frames `img_00001.jpg`, ...), an item a clip:

    frames = CachefsDataset("kinetics", master=..., paths="**/img_*.jpg")
    clips = RawframeClips(frames, frames_per_clip=8, stride=4)   # item: (video dir, [bytes])
    loader = DataLoader(clips, sampler=EpochPrefetchSampler(RandomSampler(clips), clips),
                        batch_size=4, num_workers=4, collate_fn=list)

`clip_indices(frames, 8, 4)` is the same grouping as lists of `frames` indices, for a Dataset
of your own. Frames sort by name: their numbers must be zero-padded (mmaction's `img_{:05d}`).
"""

from __future__ import annotations

import fnmatch
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from torch.utils.data import Dataset, Sampler

from cachefs.client import HINT_BYTES, PREFETCH_WINDOW, Client, clean_path
from cachefs.config import format_address, master_address
from cachefs.meta import Attr

STAT_THREADS = 16  # concurrent lookups for a list of paths


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Path components against glob components: `*`, `?`, `[...]` within one component, `**`
    any number of components (none included), as pathlib's glob."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    if not parts or not fnmatch.fnmatchcase(parts[0], pattern[0]):
        return False
    return _glob_match(parts[1:], pattern[1:])


class CachefsDataset(Dataset):
    """The files of a dataset (all, a glob's or a list's), sorted by path: item i is
    `(path, bytes)`, or `transform(path, bytes)`; paths are relative to the dataset root."""

    def __init__(
        self,
        dataset: str,
        master: str | None = None,
        paths: str | list[str] | None = None,
        transform: Callable[[str, bytes], Any] | None = None,
        secret_file: str | None = None,
        client: Client | None = None,
    ):
        self.name, self.transform, self.secret_file = dataset, transform, secret_file
        if client is not None:  # what a spawned worker needs to connect on its own
            self.master = master or format_address(client.address)
            self._tls = replace(client.tls, _contexts={}) if client.tls else None
            self._timeout = client.timeout
        else:
            self.master = master or format_address(master_address(None))
            self._tls, self._timeout = None, 60.0
        self._client, self._lock = client, threading.Lock()
        if paths is None or isinstance(paths, str):
            items = self._listing(paths or "**")
        else:
            with ThreadPoolExecutor(STAT_THREADS) as pool:
                wanted = sorted({clean_path(p) for p in paths})
                items = list(zip(wanted, pool.map(self._file_attr, wanted), strict=True))
        items.sort(key=lambda item: item[0])
        self.paths: list[str] = [path for path, _ in items]
        self._attrs: list[Attr] = [attr for _, attr in items]

    def _listing(self, glob: str) -> list[tuple[str, Attr]]:
        """The files matching `glob`, each directory listed once (a literal prefix only)."""
        pattern = clean_path(glob).split("/")
        literal = 0
        while literal < len(pattern) - 1 and not any(c in pattern[literal] for c in "*?["):
            literal += 1
        out, stack = [], ["/".join(pattern[:literal])]
        while stack:
            try:
                entries = self.client.scandir(self.name, stack.pop())
            except (FileNotFoundError, NotADirectoryError):  # the literal prefix: no match
                continue
            for entry in entries:
                if entry.is_dir:
                    stack.append(entry.path)
                elif _glob_match(entry.path.split("/"), pattern):
                    # scandir just remembered it: no call to the master
                    out.append((entry.path, self.client.attr(self.name, entry.path)))
        return out

    def _file_attr(self, path: str) -> Attr:
        attr = self.client.attr(self.name, path)  # FileNotFoundError if there is none
        if attr.is_dir:
            raise IsADirectoryError(f"{self.name}/{path} is a directory")
        return attr

    @property
    def client(self) -> Client:
        """This process's client: the one given or made here (a spawned worker makes its own)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = Client(
                        self.master, secret_file=self.secret_file, tls=self._tls,
                        timeout=self._timeout,
                    )  # fmt: skip
        return self._client

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = state["_lock"] = None  # neither crosses a process boundary
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        """File `index`'s bytes: one read, with the attributes taken at construction."""
        return self.client.read_attr(self.name, self.paths[index], self._attrs[index])

    def __getitem__(self, index: int) -> Any:
        path, data = self.paths[index], self.read(index)
        return (path, data) if self.transform is None else self.transform(path, data)

    def epoch_paths(self, order: list[int]) -> list[str]:
        """The files an epoch reads, in the order of `order` (what the sampler hints)."""
        return [self.paths[i] for i in order]


class EpochPrefetchSampler(Sampler[int]):
    """Wraps a sampler (or a batch sampler): each epoch, hands the order it draws to the
    cluster, which fetches the files ahead of the readers (`window` files in flight), then
    yields the same indices. Large epochs go as jobs of HINT_BYTES of paths each: the first
    two at once, the next one as the sampler enters the one before it."""

    def __init__(self, sampler, dataset: CachefsDataset, window: int = PREFETCH_WINDOW):
        self.sampler, self.dataset, self.window = sampler, dataset, window
        self.jobs: list[int] = []  # the master's job ids, in the order sent
        self._warned = False
        self._sender: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator:
        order = list(self.sampler)
        flat = [i for b in order for i in b] if order and isinstance(order[0], list) else order
        chunks, current, size = [], [], 0
        for path in self.dataset.epoch_paths(flat):  # jobs of at most HINT_BYTES of paths
            if current and size + len(path) + 1 > HINT_BYTES:
                chunks.append(current)
                current, size = [], 0
            current.append(path)
            size += len(path) + 1
        if current:
            chunks.append(current)
        for chunk in chunks[:2]:
            self._hint(chunk)
        return self._yield(order, [len(c) for c in chunks], chunks, len(flat) != len(order))

    def _yield(self, order, sizes, chunks, batched) -> Iterator:
        boundary, k, seen = sizes[0] if sizes else 0, 1, 0
        for item in order:
            seen += len(item) if batched else 1
            while seen > boundary and k < len(chunks):  # entering chunk k: send k + 1
                if k + 1 < len(chunks):
                    self._hint(chunks[k + 1])
                boundary, k = boundary + sizes[k], k + 1
            yield item

    def _hint(self, paths: list[str]) -> None:
        """Sends one job from a thread, after the one before (the order holds)."""
        previous = self._sender

        def send() -> None:
            if previous is not None:
                previous.join()
            try:
                self.jobs.append(
                    self.dataset.client.prefetch(self.dataset.name, paths, self.window)
                )
            except Exception as exc:  # a hint: the epoch goes on without it
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"cachefs prefetch hint not sent: {exc}", stacklevel=1)

        self._sender = threading.Thread(target=send, name="cachefs-hint", daemon=True)
        self._sender.start()


def clip_indices(frames: CachefsDataset, frames_per_clip: int, stride: int | None = None):
    """`frames`' indices as clips: `frames_per_clip` consecutive files of one directory, a clip
    starting every `stride` files (default: `frames_per_clip`, no overlap); a directory's last
    frames that make no whole clip are left out."""
    by_dir: dict[str, list[int]] = {}
    for i, path in enumerate(frames.paths):  # sorted: a directory's files are together
        by_dir.setdefault(path.rpartition("/")[0], []).append(i)
    step, n = stride or frames_per_clip, frames_per_clip
    return [ix[s : s + n] for ix in by_dir.values() for s in range(0, len(ix) - n + 1, step)]


class RawframeClips(Dataset):
    """mmaction-style rawframes: item i is `(directory, [frame bytes, ...])`, one clip of
    `clip_indices`, or `transform(directory, frames)`."""

    def __init__(self, frames: CachefsDataset, frames_per_clip: int, stride: int | None = None,
                 transform: Callable[[str, list[bytes]], Any] | None = None):  # fmt: skip
        self.frames, self.transform, self.name = frames, transform, frames.name
        self.clips = clip_indices(frames, frames_per_clip, stride)

    @property
    def client(self) -> Client:
        return self.frames.client

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Any:
        clip = self.clips[index]
        directory = self.frames.paths[clip[0]].rpartition("/")[0]
        data = [self.frames.read(i) for i in clip]
        return (directory, data) if self.transform is None else self.transform(directory, data)

    def epoch_paths(self, order: list[int]) -> list[str]:
        return [self.frames.paths[i] for c in order for i in self.clips[c]]
