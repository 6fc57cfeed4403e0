"""File attributes as the master stores them and sends them to clients.

On the wire an `Attr` is a plain list (compact msgpack, no repeated key strings), because
lookups are the hottest metadata call.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

KIND_FILE = 0
KIND_DIR = 1
#: Files up to this size are cached whole under their cache key; larger ones as blocks of it.
BLOCK_SIZE = 4 << 20
MAX_READ = 64 << 20  # one read RPC returns at most this much (a worker's `read` refuses more)
_BLOCK_INDEX = struct.Struct(">I")


class Attr(NamedTuple):
    ino: int
    kind: int  # KIND_FILE or KIND_DIR
    size: int
    mtime_ns: int
    version: int  # bumped by a sync whenever size, mtime, etag, mode or owner changed
    etag: str | None = None
    # The source's permission bits and numeric owner (file:// only); None: the mount's defaults.
    # Appended last, so a shorter list from an older master still decodes.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    def to_wire(self) -> list:
        return list(self)

    @classmethod
    def from_wire(cls, value: list) -> Attr:
        return cls(*value)


def cache_key(dataset: str, path: str, size: int, mtime_ns: int, etag: str | None = None) -> bytes:
    """The 16-byte cache key of one version of a file: a new version never reads old bytes."""
    text = "\0".join((dataset, path, str(size), str(mtime_ns), etag or ""))
    return xxhash.xxh3_128_digest(text.encode())


def block_key(key: bytes, index: int) -> bytes:
    """The cache key of block `index` of a file larger than BLOCK_SIZE."""
    return key + _BLOCK_INDEX.pack(index)


def checksum(data: bytes | memoryview) -> int:
    """The xxh3_64 every cached object carries, checked on every read from a cache tier."""
    return xxhash.xxh3_64_intdigest(data)
