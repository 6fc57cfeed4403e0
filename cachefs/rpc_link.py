"""What the RPC client and server share: a framed connection with one writer task.

On each connection a single writer task owns the stream's send side: callers only queue
frames, so a caller that is cancelled mid-call can never leave half a frame on the wire, and
frames queued by many tasks go out in one ``send_all``. The stream is a TCP stream or a
`trio.SSLStream` over one; nothing here depends on which.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from cachefs import errors
from cachefs.protocol import COPY_LIMIT, Buffer, FrameDecoder, encode_frame, error_message
from cachefs.tls import describe_ssl_error, ssl_error_in

RECV_SIZE = 64 << 10
#: Largest single receive: bounds what one read adds to a connection's buffer.
MAX_RECV_SIZE = 1 << 20
#: Bytes queued but not yet taken by the writer before senders wait (backpressure).
OUTBOX_LIMIT = 8 << 20


class Reply:
    """A handler result with bulk bytes attached (sent raw after the header).

    The payload must stay unchanged until it is sent: pass bytes unless the memory is stable.
    """

    __slots__ = ("value", "payload")

    def __init__(self, value: Any, payload: Buffer = b""):
        self.value = value
        self.payload = payload


class PeerClosed(Exception):
    pass


class LinkLost(Exception):
    """Internal: the connection died under a call (carries the error for the caller)."""

    def __init__(self, error: errors.CacheFsError):
        self.error = error


def peer_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reason_of(exc: BaseException) -> str:
    """A short human reason for a network failure."""
    if isinstance(exc, errors.CacheFsError):
        return exc.message
    ssl_error = ssl_error_in(exc)
    if ssl_error is not None:
        return describe_ssl_error(ssl_error)
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    cause = exc.__cause__
    if isinstance(exc, OSError) and isinstance(cause, BaseExceptionGroup):
        # open_tcp_stream: "all attempts failed" wrapping one error per address tried
        leaves = [reason_of(e) for e in cause.exceptions]
        return ", ".join(dict.fromkeys(leaves))
    if isinstance(exc, OSError) and exc.errno is not None:
        # os.strerror drops trio's "Error connecting to (...)" prefix; gaierror has its own text
        text = os.strerror(exc.errno) if exc.errno > 0 else exc.strerror or str(exc)
        return text.lower()
    return str(exc) or type(exc).__name__


def coalesce(bufs: list[Buffer]):
    """Join runs of small buffers (cheap copies, fewer syscalls); pass large ones through."""
    small: list[Buffer] = []
    for b in bufs:
        if len(b) < COPY_LIMIT:
            small.append(b)
            continue
        if small:
            yield b"".join(small)
            small = []
        yield b
    if small:
        yield b"".join(small)


async def recv_frame(stream: trio.abc.Stream, decoder: FrameDecoder):
    """Read exactly one frame (handshake only; later frames stay buffered in the decoder)."""
    frame = next(decoder.feed(b""), None)
    while frame is None:
        data = await stream.receive_some(RECV_SIZE)
        if not data:
            raise PeerClosed("connection closed during handshake")
        frame = next(decoder.feed(data), None)
    return frame[0]


async def send_now(stream: trio.abc.Stream, header: dict[str, Any]) -> None:
    await stream.send_all(b"".join(encode_frame(header)))


class Link:
    """A framed connection: a writer task drains the outbox, a reader task consumes frames."""

    def __init__(self, stream: trio.abc.Stream, decoder: FrameDecoder, label: str):
        self.stream = stream
        self.decoder = decoder
        self.label = label
        self.failure: BaseException | None = None  # first thing that killed the link
        self.dead = False
        self._out: list[Buffer] = []
        self._out_bytes = 0
        self._out_ready = trio.Event()
        self._out_space = trio.Event()
        self._idle = trio.Event()  # set when nothing is queued or being written
        self._idle.set()

    async def send(self, bufs: list[Buffer]) -> None:
        """Queue a frame; returns once queued (waits only when the outbox is over its limit)."""
        while self._out_bytes >= OUTBOX_LIMIT and not self.dead:
            await self._out_space.wait()
        if self.dead:
            raise LinkLost(errors.Unavailable(f"connection to {self.label} is closed"))
        self._out.extend(bufs)
        for b in bufs:
            self._out_bytes += len(b)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._out_ready.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def say_goodbye(self, error: errors.CacheFsError) -> None:
        """Tell the peer why we hang up (a connection-level error frame), within a second."""
        with trio.move_on_after(1.0):
            try:
                await self.send(encode_frame(error_message(error)))
                await self.drain()
            except LinkLost:
                pass

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, self._write_loop, nursery)
                nursery.start_soon(self._guard, self._read_loop, nursery)
        finally:
            self.dead = True
            self._out.clear()
            self._out_space.set()
            self._idle.set()
            self._on_dead()
            self.decoder.close()
            await trio.aclose_forcefully(self.stream)

    async def _guard(self, loop, nursery: trio.Nursery) -> None:
        try:
            await loop(nursery)
        except Exception as e:
            if self.failure is None:
                self.failure = e
        finally:
            nursery.cancel_scope.cancel()  # either loop ending ends the link

    async def _write_loop(self, nursery: trio.Nursery) -> None:
        while True:
            if not self._out:
                self._idle.set()
                self._out_ready = trio.Event()
                await self._out_ready.wait()
                continue
            bufs, self._out, self._out_bytes = self._out, [], 0
            self._out_space.set()
            self._out_space = trio.Event()
            for chunk in coalesce(bufs):
                await self.stream.send_all(chunk)

    async def _receive(self) -> bytes:
        want = min(max(RECV_SIZE, self.decoder.wanted()), MAX_RECV_SIZE)
        data = await self.stream.receive_some(want)
        if not data:
            raise PeerClosed("closed by peer")
        return data

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    def _on_dead(self) -> None:
        pass
