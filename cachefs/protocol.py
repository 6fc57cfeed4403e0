"""The cachefs wire format: length-prefixed frames of a msgpack header map plus raw bytes.

Pure functions and a decoder object, no I/O (`cachefs.rpc` moves the frames).

A frame is ``struct ">II"`` (header_len, payload_len), then ``header_len`` bytes of a msgpack
map, then ``payload_len`` raw bytes. Bulk data rides in the payload so it is never copied
through msgpack. Both lengths are checked as soon as the 8-byte prefix arrives, before any of
the body is buffered.

Message shapes (all headers are maps)::

    request    {"id": int, "m": method, "a": {args}, "t": seconds budget | None}  [+ payload]
    reply      {"id": int, "r": result}                                           [+ payload]
    error      {"id": int, "e": [kind, message, errno]}   kind = CacheFsError class name
    conn error {"e": [kind, message, errno]}              no id: the sender closes the link

Handshake, before any request::

    client  {"hello": "cachefs", "v": PROTOCOL_VERSION}
    server  {"v": PROTOCOL_VERSION, "nonce": bytes | None}   (or an error, then close)
    client  {"auth": hmac_sha256(secret, nonce + b"client")}  only if a nonce was sent
    server  {"ok": True}  or  {"e": ["AuthenticationFailed", ...]} then close
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

from cachefs import errors

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20
MAX_FRAME = (64 << 20) + (1 << 20)
MAX_ERROR_MESSAGE = 8192
#: Payloads below this are joined to their header (one small copy, one send).
COPY_LIMIT = 64 << 10

_PREFIX = struct.Struct(">II")
PREFIX_SIZE = _PREFIX.size

Frame = tuple[dict[str, Any], bytes]
Buffer = bytes | bytearray | memoryview


def encode_frame(
    header: dict[str, Any],
    payload: Buffer = b"",
    *,
    max_frame: int = MAX_FRAME,
    max_header: int = MAX_HEADER,
) -> list[Buffer]:
    """Encode one frame as a list of buffers to send in order (a large payload is not copied).

    Raises `ProtocolError` if the header cannot be encoded or the frame exceeds the caps.
    """
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except Exception as e:  # TypeError, OverflowError, ValueError for unsupported values
        raise errors.ProtocolError(f"cannot encode message: {e}") from e
    if isinstance(payload, memoryview) and payload.format != "B":
        payload = payload.cast("B")
    plen = len(payload)
    if len(packed) > max_header or len(packed) + plen > max_frame:
        raise errors.ProtocolError(
            f"frame too large: header {len(packed)} + payload {plen} bytes "
            f"(caps {max_header} / {max_frame})"
        )
    prefix = _PREFIX.pack(len(packed), plen)
    if plen >= COPY_LIMIT:
        return [prefix + packed, payload]
    return [b"".join((prefix, packed, payload))]


class FrameDecoder:
    """Incremental frame parser: `feed` bytes as they arrive, iterate the complete frames.

    Data is buffered eagerly but frames are parsed lazily, so a caller may take one frame and
    leave the rest buffered for the next `feed` (e.g. ``feed(b"")``). Errors raise
    `ProtocolError`; the decoder is unusable afterwards.
    """

    def __init__(self, max_frame: int = MAX_FRAME, max_header: int = MAX_HEADER):
        self.max_frame = max_frame
        self.max_header = max_header
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf; compacted once per drain, not per frame

    def feed(self, data: Buffer) -> Iterator[Frame]:
        if data:
            self._buf += data
        return self._frames()

    def wanted(self) -> int:
        """Bytes still missing for the frame being received (0 if unknown)."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < PREFIX_SIZE:
            return 0
        hlen, plen = _PREFIX.unpack_from(buf, pos)
        return max(0, pos + PREFIX_SIZE + hlen + plen - len(buf))

    def _frames(self) -> Iterator[Frame]:
        buf = self._buf
        while len(buf) - self._pos >= PREFIX_SIZE:
            pos = self._pos
            hlen, plen = _PREFIX.unpack_from(buf, pos)
            if hlen == 0 or hlen > self.max_header or hlen + plen > self.max_frame:
                raise errors.ProtocolError(
                    f"bad frame size: header {hlen} + payload {plen} bytes "
                    f"(caps {self.max_header} / {self.max_frame})"
                )
            start = pos + PREFIX_SIZE
            end = start + hlen + plen
            if len(buf) < end:
                break
            header = _unpack_header(buf[start : start + hlen])
            if plen:
                with memoryview(buf) as view:
                    payload = bytes(view[start + hlen : end])
            else:
                payload = b""
            self._pos = end  # consume before yielding: the caller may stop here
            yield header, payload
        if self._pos:
            del buf[: self._pos]
            self._pos = 0


def _unpack_header(data: bytearray) -> dict[str, Any]:
    n = len(data)
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            # Results may be keyed by inode number; with use_list=True keys are still scalars.
            strict_map_key=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    except Exception as e:  # msgpack raises ValueError subclasses, TypeError, ...
        raise errors.ProtocolError(f"undecodable header: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict):
        raise errors.ProtocolError(f"header is a {type(header).__name__}, not a map")
    return header


# -- messages ---------------------------------------------------------------------------------


def error_message(exc: errors.CacheFsError, request_id: int | None = None) -> dict[str, Any]:
    """The wire form of an error (a connection-level error when `request_id` is None)."""
    # Messages are for humans; a bounded one can never make the error frame itself too large.
    msg: dict[str, Any] = {"e": [type(exc).__name__, exc.message[:MAX_ERROR_MESSAGE], exc.errno]}
    if request_id is not None:
        msg["id"] = request_id
    return msg


def error_from_message(header: dict[str, Any]) -> errors.CacheFsError:
    """Rebuild the error carried in ``header["e"]`` (malformed ones become ProtocolError)."""
    e = header.get("e")
    if (
        isinstance(e, list)
        and len(e) == 3
        and isinstance(e[0], str)
        and isinstance(e[1], str)
        and (e[2] is None or isinstance(e[2], int))
    ):
        return errors.error_from_wire(e[0], e[1], e[2])
    return errors.ProtocolError(f"malformed error reply: {e!r}")


def hello_message() -> dict[str, Any]:
    return {"hello": "cachefs", "v": PROTOCOL_VERSION}


def check_hello(msg: dict[str, Any]) -> None:
    """Server side: accept a client's hello or raise ProtocolError (to send back, then close)."""
    if msg.get("hello") != "cachefs":
        raise errors.ProtocolError("not a cachefs client")
    if msg.get("v") != PROTOCOL_VERSION:
        raise errors.ProtocolError(
            f"protocol version mismatch: server speaks {PROTOCOL_VERSION}, client {msg.get('v')!r}"
        )


def new_nonce(secret: bytes | None) -> bytes | None:
    return os.urandom(32) if secret is not None else None


def challenge_message(nonce: bytes | None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "nonce": nonce}


def check_challenge(msg: dict[str, Any]) -> bytes | None:
    """Client side: validate the server's answer to hello; return its nonce (None: no auth)."""
    if "e" in msg:
        raise error_from_message(msg)
    if msg.get("v") != PROTOCOL_VERSION:
        raise errors.ProtocolError(
            f"protocol version mismatch: client speaks {PROTOCOL_VERSION}, server {msg.get('v')!r}"
        )
    nonce = msg.get("nonce")
    if nonce is not None and not (isinstance(nonce, bytes) and 16 <= len(nonce) <= 256):
        raise errors.ProtocolError("malformed nonce")
    return nonce


def auth_proof(secret: bytes, nonce: bytes) -> bytes:
    # The b"client" suffix keeps this proof distinct from any server-side proof on the same nonce.
    return hmac.new(secret, nonce + b"client", hashlib.sha256).digest()


def auth_message(secret: bytes, nonce: bytes) -> dict[str, Any]:
    return {"auth": auth_proof(secret, nonce)}


def check_auth(secret: bytes, nonce: bytes, msg: dict[str, Any]) -> None:
    """Server side: raise AuthenticationFailed unless `msg` proves knowledge of `secret`."""
    proof = msg.get("auth")
    if not isinstance(proof, bytes) or not hmac.compare_digest(proof, auth_proof(secret, nonce)):
        raise errors.AuthenticationFailed("authentication failed: wrong or missing shared secret")


def check_auth_reply(msg: dict[str, Any]) -> None:
    """Client side: the server's verdict on our proof."""
    if "e" in msg:
        raise error_from_message(msg)
    if msg.get("ok") is not True:
        raise errors.ProtocolError("malformed authentication reply")
