"""Training-like readers for fault tests: threads reading every file of a mount, epoch after
epoch, verifying every byte against a digest map, while a test breaks the cluster under them.

Each read opens the file, reads it whole, checks its sha256, then drops the file's pages from
the kernel's page cache (`POSIX_FADV_DONTNEED`): cachefs mounts keep the page cache across opens,
so without that every epoch after the first would be served by the kernel and never reach the
cluster being broken.

Used by tests/cluster and benchmarks/soak.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReadReport:
    files: int  # file reads that ended (verified or failed)
    epochs: int  # full passes over every file
    errors: list[tuple[str, str]]  # (path, error) of reads that raised
    wrong_files: list[str]  # paths whose bytes did not match their digest
    wrong_bytes: int  # bytes that differed (or were missing / extra) in those files
    latencies: list[float] = field(repr=False)  # seconds per file (open to close)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def max(self) -> float:
        return max(self.latencies, default=0.0)

    def summary(self) -> str:
        return (
            f"{self.files} files in {self.epochs} epochs, {self.seconds:.1f}s; "
            f"{len(self.errors)} errors, {len(self.wrong_files)} wrong files "
            f"({self.wrong_bytes} wrong bytes); latency p50 {1000 * self.p50:.1f} ms, "
            f"p99 {1000 * self.p99:.1f} ms, max {1000 * self.max:.0f} ms"
        )

    def assert_clean(self) -> None:
        assert not self.errors and not self.wrong_files, (
            f"{self.summary()}; first errors: {self.errors[:5]}; wrong: {self.wrong_files[:5]}"
        )


def differing_bytes(got: bytes, want: bytes) -> int:
    common = min(len(got), len(want))
    diff = sum(1 for a, b in zip(got[:common], want[:common], strict=True) if a != b)
    return diff + abs(len(got) - len(want))


def read_uncached(path: Path) -> bytes:
    """The file's bytes; its pages are dropped from the page cache after the read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return b"".join(chunks)


class Readers:
    """`threads` readers sharing one shuffled order per epoch over `digests` (rel -> sha256).

    Like a training loop, an epoch starts once the previous one has ended (every file read).
    `start()`, then wait for progress with `wait_files` / `wait_epochs` (deadlines, no sleeps),
    break things, and `finish()`: no new epoch starts, the current one is read to its end, and
    the report comes back. `expected(rel)` (optional) gives the true bytes, to count wrong ones.
    """

    def __init__(
        self,
        root: Path,
        digests: dict[str, str],
        *,
        threads: int = 8,
        seed: int = 0,
        expected: Callable[[str], bytes] | None = None,
    ):
        self.root = root
        self.digests = digests
        self.rels = sorted(digests)
        self.threads = threads
        self.expected = expected
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._order: list[str] = []
        self._next = 0
        self._epoch = -1  # the epoch being handed out
        self._done_in: dict[int, int] = {}  # epoch -> reads ended
        self._stopping = False
        self._limit: int | None = None  # epochs to read, if bounded
        self._workers: list[threading.Thread] = []
        self._running = 0
        self.files = 0
        self.epochs = 0
        self.errors: list[tuple[str, str]] = []
        self.wrong_files: list[str] = []
        self.wrong_bytes = 0
        self.latencies: list[float] = []
        self._started = 0.0
        self._ended: float | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> Readers:
        self._started = time.monotonic()
        self._running = self.threads
        for i in range(self.threads):
            thread = threading.Thread(target=self._run, name=f"reader-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def finish(self, timeout: float = 120.0) -> ReadReport:
        """Lets the current epoch end (every file of it read), stops, and reports."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._workers if t.is_alive()]
        assert not alive, f"readers still blocked after {timeout:.0f}s: {alive}; {self.report()}"
        return self.report()

    def run_epochs(self, n: int = 1, timeout: float = 120.0) -> ReadReport:
        """Reads exactly `n` full epochs and stops."""
        self._limit = n
        self.start()
        self.wait_epochs(n, timeout)
        return self.finish(timeout)

    def report(self) -> ReadReport:
        with self._cond:
            return self._report()

    def _report(self) -> ReadReport:
        end = self._ended or time.monotonic()
        return ReadReport(
            self.files, self.epochs, list(self.errors), list(self.wrong_files), self.wrong_bytes,
            list(self.latencies), end - self._started,
        )  # fmt: skip

    # ---- waiting for progress ------------------------------------------------------------

    def wait_files(self, n: int, timeout: float = 60.0) -> None:
        """Until at least `n` reads (from the start) have ended."""
        self._wait(lambda: self.files >= n, f"{n} files", timeout)

    def wait_more(self, n: int, timeout: float = 60.0) -> None:
        """Until `n` more reads than now have ended."""
        target = self.files + n
        self._wait(lambda: self.files >= target, f"{n} more files", timeout)

    def wait_epochs(self, n: int, timeout: float = 60.0) -> None:
        """Until at least `n` epochs (from the start) are complete."""
        self._wait(lambda: self.epochs >= n, f"{n} epochs", timeout)

    def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: done() or self._ended is not None, timeout=timeout)
            if not done():
                summary = self._report().summary()
                raise AssertionError(f"readers did not reach {what} in {timeout:.0f}s: {summary}")

    # ---- the reader threads --------------------------------------------------------------

    def _take(self) -> tuple[int, str] | None:
        with self._cond:
            if self._next >= len(self._order):
                # Like a training loop, the next epoch starts once this one has ended.
                self._cond.wait_for(lambda: self.epochs == self._epoch + 1 or self._stopping)
                if self._stopping or self._epoch + 1 == self._limit:
                    return None
                self._epoch += 1
                self._order = list(self.rels)
                self._rng.shuffle(self._order)
                self._next = 0
                self._done_in[self._epoch] = 0
            rel = self._order[self._next]
            self._next += 1
            return self._epoch, rel

    def _run(self) -> None:
        while (item := self._take()) is not None:
            epoch, rel = item
            error = wrong = None
            started = time.perf_counter()
            try:
                data = read_uncached(self.root / rel)
                latency = time.perf_counter() - started
                if hashlib.sha256(data).hexdigest() != self.digests[rel]:
                    wrong = differing_bytes(data, self.expected(rel)) if self.expected else -1
            except Exception as exc:  # every failure counts; the readers go on
                latency = time.perf_counter() - started
                error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self.files += 1
                self.latencies.append(latency)
                if error is not None:
                    self.errors.append((rel, error))
                if wrong is not None:
                    self.wrong_files.append(rel)
                    self.wrong_bytes += max(wrong, 1)
                self._done_in[epoch] += 1
                if self._done_in[epoch] == len(self.rels):
                    self.epochs += 1
                self._cond.notify_all()
        with self._cond:
            self._running -= 1
            if not self._running:
                self._ended = time.monotonic()
            self._cond.notify_all()
