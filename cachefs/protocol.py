"""The cachefs wire format: length-prefixed frames of a msgpack header map plus raw bytes.

Pure functions and a decoder object, no I/O (`cachefs.rpc` moves the frames, over TCP or, with
`cachefs.tls`, inside TLS: the handshake below then runs inside TLS too).

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
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from cachefs import errors

PROTOCOL_VERSION = 2  # 2: Attr carries mode, uid, gid; dataset_spec; auth by default
MAX_HEADER = 1 << 20
MAX_FRAME = (64 << 20) + (1 << 20)
MAX_ERROR_MESSAGE = 8192
#: Payloads below this are joined to their header (one small copy, one send).
COPY_LIMIT = 64 << 10
#: Payloads from this size on are received as a list of pieces joined once (FrameDecoder).
LARGE_PAYLOAD = 256 << 10

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

    A payload of `large` bytes or more that arrives in pieces is collected as a list of the
    pieces and joined once: growing one buffer would copy it again at every reallocation
    (dozens of times for a 1 MiB payload arriving as 16 KiB TLS records).
    """

    def __init__(
        self,
        max_frame: int = MAX_FRAME,
        max_header: int = MAX_HEADER,
        admit: Callable[[int], None] | None = None,
        large: int = LARGE_PAYLOAD,
    ):
        self.max_frame = max_frame
        self.max_header = max_header
        #: Called once per frame with its total size as soon as its lengths are known, before
        #: its body is buffered; it may raise to refuse the frame (e.g. a memory budget).
        self.admit = admit
        self.large = large
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf; compacted once per drain, not per frame
        self._admitted = False  # the frame starting at _pos has passed `admit`
        # A large payload being collected (its frame's header already decoded):
        self._big: dict[str, Any] | None = None
        self._chunks: list[Buffer] = []
        self._got = 0  # bytes of that frame received so far
        self._missing = 0  # payload bytes still to come

    def feed(self, data: Buffer) -> Iterator[Frame]:
        if self._missing and data:
            data = self._collect(data)
        if data:
            self._buf += data
        return self._frames()

    def _collect(self, data: Buffer) -> Buffer:
        """Take the large payload's share of `data`; return what belongs to later frames."""
        n = min(len(data), self._missing)
        if n == len(data):
            piece, rest = data, b""
        else:
            with memoryview(data) as view:
                piece, rest = bytes(view[:n]), bytes(view[n:])
        self._chunks.append(piece if type(piece) is bytes else bytes(piece))
        self._got += n
        self._missing -= n
        return rest

    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos + (self._got if self._big is not None else 0)

    def head(self, n: int) -> bytes:
        """The first `n` unconsumed bytes (to recognise what a confused peer is speaking)."""
        return bytes(self._buf[self._pos : self._pos + n])

    def close(self) -> None:
        """Free the buffers now: a dead connection's decoder may live on in a traceback."""
        try:
            self._buf.clear()
        except BufferError:  # a view is still exported; dropping our reference is all we can do
            pass
        self._buf = bytearray()
        self._pos = 0
        self._big, self._chunks, self._got, self._missing = None, [], 0, 0

    def wanted(self) -> int:
        """Bytes still missing for the frame being received (0 if unknown)."""
        if self._big is not None:
            return self._missing
        buf, pos = self._buf, self._pos
        if len(buf) - pos < PREFIX_SIZE:
            return 0
        hlen, plen = _PREFIX.unpack_from(buf, pos)
        return max(0, pos + PREFIX_SIZE + hlen + plen - len(buf))

    def _frames(self) -> Iterator[Frame]:
        if self._big is not None:
            if self._missing:
                return
            frame = self._big, b"".join(self._chunks)
            self._big, self._chunks, self._got = None, [], 0
            yield frame
        buf = self._buf
        while len(buf) - self._pos >= PREFIX_SIZE:
            pos = self._pos
            hlen, plen = _PREFIX.unpack_from(buf, pos)
            if hlen == 0 or hlen > self.max_header or hlen + plen > self.max_frame:
                raise errors.ProtocolError(
                    f"bad frame size: header {hlen} + payload {plen} bytes "
                    f"(caps {self.max_header} / {self.max_frame})"
                )
            if not self._admitted and self.admit is not None:
                self.admit(PREFIX_SIZE + hlen + plen)
                self._admitted = True
            start = pos + PREFIX_SIZE
            end = start + hlen + plen
            if len(buf) < end:
                if plen >= self.large and len(buf) >= start + hlen:
                    self._start_big(buf, start, hlen, end)
                break
            header = _unpack_header(buf[start : start + hlen])
            if plen:
                with memoryview(buf) as view:
                    payload = bytes(view[start + hlen : end])
            else:
                payload = b""
            self._pos = end  # consume before yielding: the caller may stop here
            self._admitted = False
            yield header, payload
        if self._pos:
            del buf[: self._pos]
            self._pos = 0

    def _start_big(self, buf: bytearray, start: int, hlen: int, end: int) -> None:
        """Move the incomplete large frame out of `buf` into the chunk list."""
        self._big = _unpack_header(buf[start : start + hlen])
        with memoryview(buf) as view:
            self._chunks = [bytes(view[start + hlen :])]
        self._got = len(buf) - start + PREFIX_SIZE
        self._missing = end - len(buf)
        self._pos = len(buf)  # consumed: the frame lives in the chunks now
        self._admitted = False


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
