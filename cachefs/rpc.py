"""Multiplexed request/reply RPC over TCP (trio), speaking `cachefs.protocol` frames.

One connection carries many concurrent calls, matched by request id. On each connection a
single writer task owns the socket's send side: callers only queue frames, so a caller that is
cancelled mid-call can never leave half a frame on the wire, and frames queued by many tasks go
out in one ``send_all``.

Server: `RpcServer(handler)` exposes the handler's ``async def rpc_<method>(self, **args)``
methods; a handler returns a plain value, or `Reply(value, payload)` to attach bulk bytes.
Client: `RpcClient(address)` used as ``async with``; `call` returns the result or raises the
`CacheFsError` subclass the server raised. Up to `pool_size` connections are opened lazily and
calls go to the least loaded one; a broken connection fails its calls with `Unavailable` and
leaves the pool, so the next call reconnects (a restarted peer is reachable again). A call
whose pooled connection turns out dead is retried once on a fresh one: cachefs RPCs are
idempotent reads.
"""

from __future__ import annotations

import errno as _errno
import inspect
import logging
import math
import os
from typing import Any

import trio

from cachefs import errors
from cachefs.config import parse_address
from cachefs.protocol import (
    COPY_LIMIT,
    MAX_FRAME,
    Buffer,
    FrameDecoder,
    auth_message,
    challenge_message,
    check_auth,
    check_auth_reply,
    check_challenge,
    check_hello,
    encode_frame,
    error_from_message,
    error_message,
    hello_message,
    new_nonce,
)

log = logging.getLogger("cachefs.rpc")

RECV_SIZE = 64 << 10
MAX_RECV_SIZE = 1 << 20
#: Bytes queued but not yet taken by the writer before senders wait (backpressure).
OUTBOX_LIMIT = 8 << 20
#: Frames before authentication are tiny; don't let strangers make us buffer megabytes.
HANDSHAKE_MAX_FRAME = 64 << 10
HANDSHAKE_TIMEOUT = 10.0
MAX_IN_FLIGHT = 256


class Reply:
    """A handler result with bulk bytes attached (sent raw after the header).

    The payload must stay unchanged until it is sent: pass bytes unless the memory is stable.
    """

    __slots__ = ("value", "payload")

    def __init__(self, value: Any, payload: Buffer = b""):
        self.value = value
        self.payload = payload


class LocalClient:
    """RpcClient's calling interface over a handler in this same process.

    Embedded mode uses it so the FUSE client reaches its own master and worker without
    sockets or encoding; deadlines still apply. Results are the handler's own objects, not
    copies: callers must treat them as read-only, as they would a decoded reply.
    """

    def __init__(self, handler: object, *, timeout: float = 30.0, name: str = "local"):
        self.handler = handler
        self.timeout = timeout
        self.name = name

    async def call(
        self,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the same per-call budget as RpcClient
        payload=b"",
        **args,
    ):
        value, _ = await self.call_with_payload(method, timeout=timeout, payload=payload, **args)
        return value

    async def call_with_payload(
        self,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        payload=b"",
        **args,
    ) -> tuple[Any, bytes]:
        fn = getattr(self.handler, f"rpc_{method}", None)
        if fn is None:
            raise errors.InvalidArgument(f"unknown method {method!r}")
        if payload:
            args["payload"] = payload
        try:
            with trio.fail_after(timeout or self.timeout):
                result = await fn(**args)
        except trio.TooSlowError:
            raise errors.TimedOut(f"{method} on {self.name} timed out") from None
        if isinstance(result, Reply):
            return result.value, bytes(result.payload)
        return result, b""


class _PeerClosed(Exception):
    pass


class _LinkLost(Exception):
    """Internal: the connection died under a call (carries the error for the caller)."""

    def __init__(self, error: errors.CacheFsError):
        self.error = error


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    """A short human reason for a network failure."""
    if isinstance(exc, errors.CacheFsError):
        return exc.message
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    cause = exc.__cause__
    if isinstance(exc, OSError) and isinstance(cause, BaseExceptionGroup):
        # open_tcp_stream: "all attempts failed" wrapping one error per address tried
        leaves = [_reason(e) for e in cause.exceptions]
        return ", ".join(dict.fromkeys(leaves))
    if isinstance(exc, OSError) and exc.errno is not None:
        # os.strerror drops trio's "Error connecting to (...)" prefix; gaierror has its own text
        text = os.strerror(exc.errno) if exc.errno > 0 else exc.strerror or str(exc)
        return text.lower()
    return str(exc) or type(exc).__name__


def _coalesce(bufs: list[Buffer]):
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


async def _recv_frame(stream: trio.SocketStream, decoder: FrameDecoder):
    """Read exactly one frame (handshake only; later frames stay buffered in the decoder)."""
    frame = next(decoder.feed(b""), None)
    while frame is None:
        data = await stream.receive_some(RECV_SIZE)
        if not data:
            raise _PeerClosed("connection closed during handshake")
        frame = next(decoder.feed(data), None)
    return frame[0]


async def _send_now(stream: trio.SocketStream, header: dict[str, Any]) -> None:
    await stream.send_all(b"".join(encode_frame(header)))


class _Link:
    """A framed connection: a writer task drains the outbox, a reader task consumes frames."""

    def __init__(self, stream: trio.SocketStream, decoder: FrameDecoder, label: str):
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
            raise _LinkLost(errors.Unavailable(f"connection to {self.label} is closed"))
        self._out.extend(bufs)
        for b in bufs:
            self._out_bytes += len(b)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._out_ready.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, self._write_loop, nursery)
                nursery.start_soon(self._guard, self._read_loop, nursery)
        finally:
            self.dead = True
            self._out_space.set()
            self._idle.set()
            self._on_dead()
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
            for chunk in _coalesce(bufs):
                await self.stream.send_all(chunk)

    async def _receive(self) -> bytes:
        want = min(max(RECV_SIZE, self.decoder.wanted()), MAX_RECV_SIZE)
        data = await self.stream.receive_some(want)
        if not data:
            raise _PeerClosed("closed by peer")
        return data

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    def _on_dead(self) -> None:
        pass


# -- server -----------------------------------------------------------------------------------


class RpcServer:
    """Serves a handler object's ``rpc_*`` coroutine methods to authenticated peers."""

    def __init__(
        self,
        handler: object,
        *,
        secret: bytes | None = None,
        max_frame: int = MAX_FRAME,
        name: str = "rpc",
        max_in_flight: int = MAX_IN_FLIGHT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ):
        self.secret = secret
        self.max_frame = max_frame
        self.name = name
        self.max_in_flight = max_in_flight
        self.handshake_timeout = handshake_timeout
        self._methods: dict[str, Any] = {}
        for attr in dir(handler):
            if attr.startswith("rpc_"):
                fn = getattr(handler, attr)
                if not inspect.iscoroutinefunction(fn):
                    raise TypeError(f"{type(handler).__name__}.{attr} must be 'async def'")
                self._methods[attr[4:]] = fn

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port (0 picks a port); report ``(host, port)`` once ready."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self, listeners: list, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            host, port = listeners[0].socket.getsockname()[:2]
            log.info("%s listening on %s", self.name, _label(host, port))
            task_status.started((host, port))

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = _label(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        try:
            decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
            try:
                with trio.fail_after(self.handshake_timeout):
                    await self._handshake(stream, decoder)
            except trio.TooSlowError:
                log.debug("%s: no handshake from %s, closing", self.name, peer)
                return
            except errors.CacheFsError as e:
                log.warning("%s: rejected %s: %s", self.name, peer, e.message)
                with trio.move_on_after(1.0):
                    await _send_now(stream, error_message(e))
                return
            decoder.max_frame = self.max_frame
            conn = _ServerConn(self, stream, decoder, peer)
            await conn.run()
            if isinstance(conn.failure, errors.CacheFsError):
                log.warning(
                    "%s: closed connection from %s: %s", self.name, peer, _reason(conn.failure)
                )
            elif conn.failure is not None:
                log.debug(
                    "%s: connection from %s ended: %s", self.name, peer, _reason(conn.failure)
                )
        except (_PeerClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("%s: connection from %s ended: %s", self.name, peer, _reason(e))
        except Exception:  # a bug here must not take the whole server down
            log.exception("%s: connection from %s crashed", self.name, peer)

    async def _handshake(self, stream: trio.SocketStream, decoder: FrameDecoder) -> None:
        check_hello(await _recv_frame(stream, decoder))
        nonce = new_nonce(self.secret)
        await _send_now(stream, challenge_message(nonce))
        if nonce is not None:
            check_auth(self.secret, nonce, await _recv_frame(stream, decoder))
            await _send_now(stream, {"ok": True})

    async def _dispatch(self, header: dict[str, Any], payload: bytes) -> list[Buffer]:
        """Run one request; return its encoded reply or error frame (never raises Exception)."""
        rid = header["id"]
        method = header.get("m")
        try:
            value = await self._invoke(method, header, payload)
        except Exception as e:
            e = _single(e)
            if isinstance(e, errors.CacheFsError):
                return encode_frame(error_message(e, rid))
            log.error("%s: %s failed", self.name, method, exc_info=e)
            return _internal_error(rid, f"{type(e).__name__}: {e}")
        out: Buffer = b""
        if type(value) is Reply:
            value, out = value.value, value.payload
        try:
            return encode_frame({"id": rid, "r": value}, out, max_frame=self.max_frame)
        except errors.ProtocolError as e:  # the handler returned something we cannot send
            log.error("%s: %s returned an unsendable result: %s", self.name, method, e.message)
            return _internal_error(rid, e.message)

    async def _invoke(self, method: Any, header: dict[str, Any], payload: bytes) -> Any:
        fn = self._methods.get(method) if isinstance(method, str) else None
        if fn is None:
            raise errors.InvalidArgument(f"unknown method {method!r}")
        args = header.get("a") or {}
        budget = header.get("t")
        if not isinstance(args, dict):
            raise errors.InvalidArgument(f"{method}: arguments must be a map")
        if budget is not None and (not isinstance(budget, int | float) or math.isnan(budget)):
            raise errors.InvalidArgument(f"{method}: bad time budget {budget!r}")
        if payload:
            args["payload"] = payload
        try:
            coro = fn(**args)  # binding errors surface here, before any handler code runs
        except TypeError as e:
            raise errors.InvalidArgument(f"bad arguments for {method!r}: {e}") from None
        if budget is None:
            return await coro
        with trio.move_on_after(max(budget, 0.0)):
            return await coro
        raise errors.TimedOut(f"{method} timed out after {budget:.3g}s on {self.name}")


def _internal_error(rid: int, detail: str) -> list[Buffer]:
    error = errors.CacheFsError(f"internal error: {detail}", errno=_errno.EIO)
    return encode_frame(error_message(error, rid))


def _single(e: Exception) -> Exception:
    """Unwrap a group holding exactly one error (a handler's nursery wraps what it raises)."""
    while isinstance(e, ExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


class _ServerConn(_Link):
    def __init__(self, server: RpcServer, stream, decoder, label):
        super().__init__(stream, decoder, label)
        self.server = server
        self._slots = trio.Semaphore(server.max_in_flight)

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        slots = self._slots
        try:
            while True:
                for header, payload in self.decoder.feed(await self._receive()):
                    if type(header.get("id")) is not int:
                        raise errors.ProtocolError("request without an integer id")
                    try:
                        slots.acquire_nowait()
                    except trio.WouldBlock:  # in-flight cap: stop reading until a call ends
                        await slots.acquire()
                    nursery.start_soon(self._serve, header, payload)
        except errors.ProtocolError as e:
            # Say why before hanging up; the peer may be a confused client, not an attacker.
            with trio.move_on_after(1.0):
                try:
                    await self.send(encode_frame(error_message(e)))
                    await self.drain()
                except _LinkLost:
                    pass
            raise

    async def _serve(self, header: dict[str, Any], payload: bytes) -> None:
        try:
            await self.send(await self.server._dispatch(header, payload))
        except _LinkLost:
            pass
        finally:
            self._slots.release()


# -- client -----------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("event", "header", "payload", "error")

    def __init__(self):
        self.event = trio.Event()
        self.header: dict[str, Any] | None = None
        self.payload = b""
        self.error: errors.CacheFsError | None = None


class _ClientConn(_Link):
    def __init__(self, client: RpcClient, stream, decoder):
        super().__init__(stream, decoder, f"{client.name} at {client.label}")
        self.client = client
        self.waiters: dict[int, _Waiter] = {}
        self.opened_at = trio.current_time()
        self.scope = trio.CancelScope()
        self._last_id = 0

    async def run(self) -> None:
        with self.scope:
            await super().run()

    async def call(self, method: str, args: dict, payload: Buffer, deadline: float):
        if self.dead:
            raise _LinkLost(errors.Unavailable(f"connection to {self.label} is closed"))
        self._last_id = rid = self._last_id + 1
        header = {"id": rid, "m": method, "a": args, "t": deadline - trio.current_time()}
        try:
            bufs = encode_frame(header, payload, max_frame=self.decoder.max_frame)
        except errors.ProtocolError as e:
            raise errors.InvalidArgument(f"cannot send {method}: {e.message}") from None
        waiter = self.waiters[rid] = _Waiter()
        try:
            await self.send(bufs)
            await waiter.event.wait()
        finally:
            self.waiters.pop(rid, None)  # on cancellation too; a late reply is then ignored
        if waiter.error is not None:
            raise _LinkLost(waiter.error)
        if "e" in waiter.header:
            raise error_from_message(waiter.header)
        return waiter.header.get("r"), waiter.payload

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        waiters = self.waiters
        while True:
            for header, payload in self.decoder.feed(await self._receive()):
                rid = header.get("id")
                waiter = waiters.pop(rid, None) if type(rid) is int else None
                if waiter is not None:
                    waiter.header = header
                    waiter.payload = payload
                    waiter.event.set()
                elif rid is None and "e" in header:
                    raise error_from_message(header)  # the server is hanging up; say why
                # else: a reply for a call that already gave up

    def _on_dead(self) -> None:
        client = self.client
        reason = _reason(self.failure) if self.failure is not None else "client closed"
        msg = f"connection to {self.label} lost: {reason}"
        for waiter in self.waiters.values():
            waiter.error = errors.Unavailable(msg)
            waiter.event.set()
        if self in client._conns:
            client._conns.remove(self)
        client._running.discard(self)


class RpcClient:
    """A pool of multiplexed connections to one server. Use as ``async with RpcClient(...)``."""

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        secret: bytes | None = None,
        pool_size: int = 2,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        max_frame: int = MAX_FRAME,
        name: str = "peer",
    ):
        self.host, self.port = parse_address(address)
        self.label = _label(self.host, self.port)
        self.secret = secret
        self.pool_size = max(1, pool_size)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_frame = max_frame
        self.name = name
        self._conns: list[_ClientConn] = []  # live, usable connections
        self._running: set[_ClientConn] = set()  # every connection task not yet finished
        self._connect_lock = trio.Lock()
        self._connect_attempts = 0
        self._connect_error: errors.CacheFsError | None = None
        self._nursery_cm = None
        self._nursery: trio.Nursery | None = None
        self._closed = False

    async def __aenter__(self) -> RpcClient:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info) -> bool:
        self.close()
        # The body's exception (if any) propagates as is, not wrapped in an ExceptionGroup.
        await self._nursery_cm.__aexit__(None, None, None)
        self._nursery = None
        return False

    def close(self) -> None:
        """Close every connection; later calls raise Unavailable."""
        self._closed = True
        for conn in list(self._running):
            conn.scope.cancel()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def call(
        self,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-call budget, also sent to the server)
        payload: Buffer = b"",
        **args: Any,
    ) -> Any:
        """Call `method` with keyword `args`; return its result or raise its CacheFsError.

        `timeout` (default: the client's) bounds the whole call, connecting included, and the
        remaining budget travels with the request so the server gives up too.
        """
        value, _ = await self.call_with_payload(method, timeout=timeout, payload=payload, **args)
        return value

    async def call_with_payload(
        self,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        payload: Buffer = b"",
        **args: Any,
    ) -> tuple[Any, bytes]:
        """Like `call`, also returning the reply's payload bytes."""
        if timeout is None:
            timeout = self.timeout
        start = trio.current_time()
        deadline = start + timeout
        with trio.move_on_at(deadline):
            conn = await self._connection()
            try:
                return await conn.call(method, args, payload, deadline)
            except _LinkLost as lost:
                if conn.opened_at >= start:
                    raise lost.error from None
            # A pooled connection that was already dead (e.g. the peer restarted): retry once on
            # a fresh one. Safe because every cachefs RPC is an idempotent read.
            conn = await self._connection()
            try:
                return await conn.call(method, args, payload, deadline)
            except _LinkLost as lost:
                raise lost.error from None
        raise errors.TimedOut(f"{method} to {self.label} timed out after {timeout:g}s")

    def _least_loaded(self) -> _ClientConn | None:
        return min(self._conns, key=lambda c: len(c.waiters), default=None)

    async def _connection(self) -> _ClientConn:
        """A live connection: the least loaded one, or a new one while the pool may grow."""
        best = self._least_loaded()
        # An idle connection, a full pool, or a pool already growing: use what we have.
        if best is not None and (
            not best.waiters or len(self._conns) >= self.pool_size or self._connect_lock.locked()
        ):
            return best
        attempts = self._connect_attempts
        async with self._connect_lock:
            best = self._least_loaded()
            if best is not None and (not best.waiters or len(self._conns) >= self.pool_size):
                return best
            if best is None and attempts != self._connect_attempts and self._connect_error:
                # Someone failed to connect while we queued: share the verdict, don't retry.
                e = self._connect_error
                raise type(e)(e.message, errno=e.errno)
            try:
                conn = await self._connect()
            except errors.CacheFsError as e:
                self._connect_error = e
                if best is not None and not best.dead:
                    return best  # growing the pool is optional
                raise
            finally:
                self._connect_attempts += 1
            self._connect_error = None
            return conn

    async def _connect(self) -> _ClientConn:
        if self._closed:
            raise errors.Unavailable(f"client for {self.name} at {self.label} is closed")
        if self._nursery is None:
            raise RuntimeError("RpcClient must be used as 'async with RpcClient(...)'")
        stream = None
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)  # sets TCP_NODELAY
                decoder = FrameDecoder(self.max_frame)
                await self._handshake(stream, decoder)
        except BaseException as e:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(e, trio.TooSlowError):
                reason = f"no answer within {self.connect_timeout:.3g}s"
            elif isinstance(e, OSError | trio.BrokenResourceError | _PeerClosed):
                reason = _reason(e)
            elif isinstance(e, errors.CacheFsError):  # refused by the peer: say which peer
                raise type(e)(f"{self.name} at {self.label}: {e.message}", errno=e.errno) from None
            else:
                raise
            msg = f"cannot reach {self.name} at {self.label}: {reason}"
            raise errors.Unavailable(msg) from None
        conn = _ClientConn(self, stream, decoder)
        self._conns.append(conn)
        self._running.add(conn)
        self._nursery.start_soon(conn.run)
        return conn

    async def _handshake(self, stream: trio.SocketStream, decoder: FrameDecoder) -> None:
        await _send_now(stream, hello_message())
        try:
            challenge = await _recv_frame(stream, decoder)
        except errors.ProtocolError as e:
            raise errors.ProtocolError(f"not a cachefs server ({e.message})") from None
        nonce = check_challenge(challenge)
        if nonce is None:
            return
        if self.secret is None:
            raise errors.AuthenticationFailed("a shared secret is required (--secret-file)")
        await _send_now(stream, auth_message(self.secret, nonce))
        check_auth_reply(await _recv_frame(stream, decoder))
