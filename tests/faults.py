"""Wrappers around real parts, for faults a real part can't produce on demand (and counting).

A remote store's faults and latency: tests/store_proxy.py."""

from __future__ import annotations

import threading
import time


class FaultyFs:
    """Delegates to a real pyarrow filesystem; `faults` holds exceptions to raise first."""

    def __init__(self, real, faults=(), block: threading.Event | None = None):
        self.real = real
        self.faults = list(faults)
        self.block = block
        self.calls = 0
        self.opens = 0  # open_input_file calls: the remote data reads
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def _enter(self):
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            fault = self.faults.pop(0) if self.faults else None
        try:
            if self.block is not None:
                self.block.wait(timeout=30)
            if fault is not None:
                raise fault
            time.sleep(0.01)  # long enough for concurrent calls to overlap
        finally:
            with self._lock:
                self.active -= 1

    def get_file_info(self, arg):
        self._enter()
        return self.real.get_file_info(arg)

    def open_input_file(self, path):
        with self._lock:
            self.opens += 1
        self._enter()
        return self.real.open_input_file(path)

