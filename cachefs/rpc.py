"""Multiplexed request/reply RPC over TCP (trio), speaking `cachefs.protocol` frames.

One connection carries many concurrent calls, matched by request id (`cachefs.rpc_link` has
the connection machinery both sides share). Optionally the byte stream runs inside TLS
(`cachefs.tls`); the shared-secret handshake then runs inside TLS too.

Server: `RpcServer` (in `cachefs.rpc_server`, re-exported here) exposes a handler's
``async def rpc_<method>(self, **args)`` methods within `ServerLimits`.
Client: `RpcClient(address)` used as ``async with``; `call` returns the result or raises the
`CacheFsError` subclass the server raised. Up to `pool_size` connections are opened lazily and
calls go to the least loaded one; a broken connection fails its calls with `Unavailable` and
leaves the pool, so the next call reconnects (a restarted peer is reachable again). A call
whose pooled connection turns out dead (the peer restarted, or closed it for idleness) is
retried once on a fresh one: cachefs RPCs are idempotent reads.
"""

from __future__ import annotations

from typing import Any

import trio

from cachefs import errors
from cachefs.config import parse_address
from cachefs.protocol import (
    MAX_FRAME,
    Buffer,
    FrameDecoder,
    auth_message,
    check_auth_reply,
    check_challenge,
    encode_frame,
    error_from_message,
    hello_message,
)
from cachefs.rpc_limits import ServerLimits
from cachefs.rpc_link import (
    Link,
    LinkLost,
    PeerClosed,
    Reply,
    peer_label,
    reason_of,
    recv_frame,
    send_now,
)
from cachefs.rpc_server import RpcServer
from cachefs.tls import TlsConfig, handshake_error, ssl_error_in

__all__ = ["LocalClient", "Reply", "RpcClient", "RpcServer", "ServerLimits", "TlsConfig"]


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


class _Waiter:
    __slots__ = ("event", "header", "payload", "error")

    def __init__(self):
        self.event = trio.Event()
        self.header: dict[str, Any] | None = None
        self.payload = b""
        self.error: errors.CacheFsError | None = None


class _ClientConn(Link):
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
            raise LinkLost(errors.Unavailable(f"connection to {self.label} is closed"))
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
            raise LinkLost(waiter.error)
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
        reason = reason_of(self.failure) if self.failure is not None else "client closed"
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
        tls: TlsConfig | None = None,
    ):
        self.host, self.port = parse_address(address)
        self.tls = tls
        self.label = peer_label(self.host, self.port)
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
            except LinkLost as lost:
                if conn.opened_at >= start:
                    raise lost.error from None
            # A pooled connection that was already dead (e.g. the peer restarted): retry once on
            # a fresh one. Safe because every cachefs RPC is an idempotent read.
            conn = await self._connection()
            try:
                return await conn.call(method, args, payload, deadline)
            except LinkLost as lost:
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
                if self.tls is not None:
                    stream = self.tls.wrap_client(stream, self.host)
                    await stream.do_handshake()
                decoder = FrameDecoder(self.max_frame)
                await self._handshake(stream, decoder)
        except BaseException as e:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            ssl_error = ssl_error_in(e) if isinstance(e, Exception) else None
            if ssl_error is not None:  # a server that rejects our certificate says so only now
                raise handshake_error(ssl_error, f"{self.name} at {self.label}", self.tls) from None
            if isinstance(e, trio.TooSlowError):
                reason = f"no answer within {self.connect_timeout:.3g}s"
            elif isinstance(e, OSError | trio.BrokenResourceError | PeerClosed):
                reason = reason_of(e)
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

    async def _handshake(self, stream: trio.abc.Stream, decoder: FrameDecoder) -> None:
        await send_now(stream, hello_message())
        try:
            challenge = await recv_frame(stream, decoder)
        except errors.ProtocolError as e:
            raise errors.ProtocolError(f"not a cachefs server ({e.message})") from None
        nonce = check_challenge(challenge)
        if nonce is None:
            return
        if self.secret is None:
            raise errors.AuthenticationFailed(
                "credentials missing: it requires the cluster's shared secret (--secret-file F "
                "or $CACHEFS_SECRET_FILE; the master's user on its host finds it without them)"
            )
        await send_now(stream, auth_message(self.secret, nonce))
        check_auth_reply(await recv_frame(stream, decoder))
