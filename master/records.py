"""How the master's lmdb records are keyed and encoded (master/namespace.py has the layout):
shared by the store and by the sync that rewrites a dataset's entries (master/sync.py)."""

from __future__ import annotations

import struct

import msgpack

from cachefs.meta import Attr

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
ROOT_PARENT = 0
FIRST_INO = 2  # 1 is the FUSE root; keeping it unused avoids confusing the two
WRITE_BATCH = 20_000


def entry_key(ds_id: int, parent: int, name: str) -> bytes:
    return U32.pack(ds_id) + U64.pack(parent) + name.encode()


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw) -> object:
    return msgpack.unpackb(raw, raw=False)


def record_attr(record: list) -> Attr:
    return Attr(*record[:6], *record[7:10])


def record_owner(record: list) -> tuple:
    """(mode, uid, gid) of a record; Nones for records written before they were kept."""
    return tuple(record[7:10]) + (None,) * (10 - max(7, len(record)))
