"""Per-dataset controls the master keeps and every worker applies (issue 17 item 3).

    pinned       bool         the dataset's cached entries are never evicted
    quota_bytes  int | None   the dataset takes at most this much of the cluster's cache
    ttl_seconds  float | None entries are dropped this long after they were stored

They live in the master's lmdb (one meta document, `controls`: name -> the non-default
fields), so they survive master restarts and backups, and are forgotten with the dataset.
Workers get them with every register and heartbeat reply (new workers too) and at once when
they change (`MasterService.rpc_dataset_set` pushes them); worker/controls.py applies them.

A quota is the cluster's: each live worker keeps at most quota / live workers of the dataset
(placement spreads files evenly over workers by rendezvous hashing), so it follows membership.
A reply carries the master's instance and a revision that grows with each change, so a
worker never lets an older reply undo a newer push.
"""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING

from cachefs.errors import InvalidArgument

if TYPE_CHECKING:
    from cachefs.master.namespace import MetadataStore

META_KEY = "controls"
DEFAULTS = {"pinned": False, "quota_bytes": None, "ttl_seconds": None}
MAX_QUOTA = 1 << 60
MAX_TTL = 100 * 365 * 86400.0


def check_changes(changes: object) -> dict:
    """Validated control changes (None clears quota_bytes or ttl_seconds)."""
    if not isinstance(changes, dict) or not changes:
        raise InvalidArgument("nothing to change: give pinned, quota_bytes or ttl_seconds")
    out = {}
    for field, value in changes.items():
        if field == "pinned":
            if not isinstance(value, bool):
                raise InvalidArgument("pinned is true or false")
        elif field == "quota_bytes":
            if value is not None and (type(value) is not int or not 0 < value <= MAX_QUOTA):
                raise InvalidArgument(f"a quota is a positive size, or none (got {value!r})")
        elif field == "ttl_seconds":
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise InvalidArgument(f"a TTL is a duration, or none (got {value!r})")
                if not (math.isfinite(value) and 0 < value <= MAX_TTL):
                    raise InvalidArgument(f"a TTL is positive and at most 100 years (got {value})")
                value = float(value)
        else:
            raise InvalidArgument(f"unknown control {field!r} (pinned, quota_bytes, ttl_seconds)")
        out[field] = value
    return out


def worker_share(quota: int, workers: int) -> int:
    """One live worker's part of a cluster-wide quota (rounded up)."""
    return -(-quota // max(1, workers))


class ControlBook:
    """The controls of every dataset, persisted in the master's meta documents."""

    def __init__(self, store: MetadataStore):
        self._store = store
        self._by_name: dict[str, dict] = dict(store.get_meta(META_KEY) or {})
        self.instance = uuid.uuid4().hex  # this master process: revisions restart with it
        self.revision = 0

    def get(self, name: str) -> dict:
        """A dataset's controls, every field present."""
        return {**DEFAULTS, **self._by_name.get(name, {})}

    def update(self, name: str, changes: dict) -> dict:
        """Applies (validated) changes to a dataset's controls, saves them; the new controls."""
        merged = {**self.get(name), **check_changes(changes)}
        kept = {k: v for k, v in merged.items() if v != DEFAULTS[k]}
        if kept:
            self._by_name[name] = kept
        else:
            self._by_name.pop(name, None)
        self._save()
        return merged

    def forget(self, name: str) -> None:
        if self._by_name.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        self._store.set_meta(META_KEY, self._by_name)
        self.revision += 1

    def for_workers(self, workers: int) -> dict:
        """What a worker applies, with each quota cut to its share among `workers` live ones."""
        datasets = {}
        for name, kept in self._by_name.items():
            control = {**DEFAULTS, **kept}
            if control["quota_bytes"] is not None:
                control["quota_bytes"] = worker_share(control["quota_bytes"], workers)
            datasets[name] = control
        return {"instance": self.instance, "revision": self.revision, "datasets": datasets}
