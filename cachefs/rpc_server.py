"""The RPC server: exposes a handler's ``rpc_*`` methods to authenticated peers, within limits.

`RpcServer(handler)` serves ``async def rpc_<method>(self, **args)`` methods; a handler returns
a plain value, or `Reply(value, payload)` to attach bulk bytes. Each request runs as its own
task (at most `max_in_flight` per connection).

Resources are bounded per server (`ServerLimits`, policy in `cachefs.rpc_limits`): request
bytes held across connections, time to finish a started frame, idle time, and the number of
connections, where a newcomer displaces the connection idle the longest. Every such closure
sends a one-line error frame first, so the peer can tell "server busy" from a crash.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import inspect
import logging
import math
import resource
import socket
from collections import deque
from typing import Any

import trio

from cachefs import errors
from cachefs.protocol import (
    MAX_FRAME,
    Buffer,
    FrameDecoder,
    challenge_message,
    check_auth,
    check_hello,
    encode_frame,
    error_message,
    new_nonce,
)
from cachefs.rpc_limits import ByteBudget, ConnectionTable, ServerLimits
from cachefs.rpc_link import Link, LinkLost, PeerClosed, Reply, peer_label, reason_of, recv_frame
from cachefs.rpc_link import send_now as _send_now
from cachefs.tls import TLS_RECORD_HANDSHAKE, TlsConfig, describe_ssl_error, ssl_error_in

log = logging.getLogger("cachefs.rpc")  # the name operators already filter on

#: Frames before authentication are tiny; don't let strangers make us buffer megabytes.
HANDSHAKE_MAX_FRAME = 64 << 10
HANDSHAKE_TIMEOUT = 10.0
MAX_IN_FLIGHT = 256
#: File descriptors left for everything but connections (lmdb, outgoing clients, logs).
FD_RESERVE = 256
#: At most one warning per kind per this many seconds; an attack must not flood the log.
WARN_INTERVAL = 10.0
#: Request bytes released before the sweeper returns free heap memory to the OS.
TRIM_AFTER = 32 << 20


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    # Linux refuses an infinite open-files limit (it is capped by fs.nr_open).
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, e)
    return soft


_libc = None


def return_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Request buffers are freed into malloc's heap, which glibc returns to the OS only from its
    top; after a burst of big requests most of it would stay in the process's RSS.
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


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
        tls: TlsConfig | None = None,
        limits: ServerLimits | None = None,
    ):
        self.secret = secret
        self.max_frame = max_frame
        self.name = name
        self.max_in_flight = max_in_flight
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        if tls is not None:
            tls.server_context()  # a config without a certificate fails here, not per peer
        self.limits = limits or ServerLimits()
        if self.limits.large_frame_budget < max_frame:
            raise ValueError(
                f"max_buffered - small_reserve ({self.limits.large_frame_budget}) must hold "
                f"one frame of max_frame ({max_frame}) bytes"
            )
        self.budget: ByteBudget[_ServerConn] = ByteBudget.for_limits(self.limits)
        self.connections: ConnectionTable[_ServerConn] = ConnectionTable(
            self.limits.max_connections
        )
        self._warned: dict[str, tuple[float, int]] = {}
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
        self._fit_connection_cap()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep)
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            host, port = listeners[0].socket.getsockname()[:2]
            log.info("%s listening on %s", self.name, peer_label(host, port))
            task_status.started((host, port))

    def _fit_connection_cap(self) -> None:
        # Make the connection cap, not EMFILE, the limit a crowd of peers runs into.
        wanted = self.limits.max_connections
        room = raise_open_files_limit() - FD_RESERVE
        if room < wanted:
            log.warning(
                "%s: RLIMIT_NOFILE allows only %d connections (wanted %d); raise the hard limit",
                self.name, max(1, room), wanted,
            )  # fmt: skip
        self.connections.capacity = max(1, min(wanted, room))

    async def _sweep(self) -> None:
        """Close connections past their frame or idle deadline; runs as long as the server.

        One task looking every eighth of the shorter timeout costs less than a timer per
        receive; a deadline is therefore enforced up to that much late.
        """
        limits = self.limits
        period = max(0.02, min(limits.frame_timeout, limits.idle_timeout) / 8)
        trimmed_at = 0
        while True:
            await trio.sleep(period)
            if self.budget.released - trimmed_at >= TRIM_AFTER:
                trimmed_at = self.budget.released
                return_free_memory()  # a few ms at most, and only after big requests
            now = trio.current_time()
            for conn in self.connections.idle_for(limits.idle_timeout, now):
                # Handshakes have their own timeout, and so does a frame being received.
                if conn.authenticated and conn.frame_started is None:
                    conn.close_with(_quiet(f"closing connection idle for {limits.idle_timeout:g}s"))
            late = now - limits.frame_timeout
            for conn in self.connections:
                if conn.frame_started is not None and conn.frame_started <= late:
                    conn.close_with(
                        errors.TimedOut(
                            f"request not received within {limits.frame_timeout:g}s of its "
                            "start; closing"
                        )
                    )

    def warn(self, kind: str, msg: str, *args: Any) -> None:
        """A warning, at most one per `kind` per WARN_INTERVAL (the rest are counted)."""
        now = trio.current_time()
        last, skipped = self._warned.get(kind, (-math.inf, 0))
        if now - last < WARN_INTERVAL:
            self._warned[kind] = (last, skipped + 1)
            return
        self._warned[kind] = (now, 0)
        suffix = f" (and {skipped} more like it)" if skipped else ""
        log.warning("%s: " + msg + suffix, self.name, *args)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_label(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        conn = _ServerConn(self, stream, peer)
        admission = self.connections.admit(conn, trio.current_time())
        if not admission.admitted:
            self.warn("full", "refused %s: %d connections open, none idle", peer,
                      len(self.connections))  # fmt: skip
            await conn.refuse(
                errors.Unavailable(
                    f"server busy: {len(self.connections)} connections open, none idle"
                )
            )
            return
        if admission.victim is not None:
            admission.victim.evict()
        try:
            await conn.serve()
        except (PeerClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("%s: connection from %s ended: %s", self.name, peer, reason_of(e))
        except Exception:  # a bug here must not take the whole server down
            log.exception("%s: connection from %s crashed", self.name, peer)
        finally:
            self.connections.remove(conn)
            self.budget.release_all(conn)
            conn.decoder.close()
            conn.failure = None  # break conn -> traceback -> conn now, not at the next GC

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


def _quiet(message: str) -> errors.Unavailable:
    """A routine closure (idle, evicted): said to the peer, logged at debug level only."""
    error = errors.Unavailable(message)
    error.quiet = True
    return error


class _ServerConn(Link):
    """One accepted connection, from its handshake to its close."""

    def __init__(self, server: RpcServer, stream: trio.SocketStream, label: str):
        super().__init__(stream, FrameDecoder(HANDSHAKE_MAX_FRAME), label)
        self.server = server
        self._slots = trio.Semaphore(server.max_in_flight)
        self._charges: deque[int] = deque()  # budget of each admitted frame not yet dispatched
        self._handshake_scope = trio.CancelScope()
        self._reader_scope = trio.CancelScope()  # cancelled by close_with()
        self.frame_started: float | None = None  # when the partial frame began arriving
        self.authenticated = False
        self._closing: errors.CacheFsError | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def serve(self) -> None:
        server = self.server
        with self._handshake_scope:
            try:
                with trio.fail_after(server.handshake_timeout):
                    await self._handshake()
            except trio.TooSlowError:
                log.debug("%s: no handshake from %s, closing", server.name, self.label)
                return
            except trio.BrokenResourceError as e:
                ssl_error = ssl_error_in(e)
                if ssl_error is None:
                    raise
                server.warn("tls", "TLS handshake with %s failed: %s", self.label,
                            describe_ssl_error(ssl_error))  # fmt: skip
                return
            except errors.CacheFsError as e:
                server.warn("rejected", "rejected %s: %s", self.label, e.message)
                with trio.move_on_after(1.0):
                    await _send_now(self.stream, error_message(e))
                return
        if self._handshake_scope.cancelled_caught:  # evicted before it authenticated
            return
        self.authenticated = True
        server.connections.touch(self, trio.current_time())
        self.decoder.max_frame = server.max_frame
        self.decoder.admit = self._admit
        await self.run()
        failure = self.failure
        if failure is None or getattr(failure, "quiet", False):
            log.debug("%s: closed connection from %s: %s", server.name, self.label,
                      reason_of(failure) if failure else "done")  # fmt: skip
        elif isinstance(failure, errors.CacheFsError):
            server.warn(type(failure).__name__, "closed connection from %s: %s", self.label,
                        reason_of(failure))  # fmt: skip
        else:
            log.debug("%s: connection from %s ended: %s", server.name, self.label,
                      reason_of(failure))  # fmt: skip

    async def _handshake(self) -> None:
        server = self.server
        if server.tls is not None:
            await self._expect_tls()
            self.stream = server.tls.wrap_server(self.stream)
            await self.stream.do_handshake()
        check_hello(await self._first_frame())
        nonce = new_nonce(server.secret)
        await _send_now(self.stream, challenge_message(nonce))
        if nonce is not None:
            check_auth(server.secret, nonce, await recv_frame(self.stream, self.decoder))
            await _send_now(self.stream, {"ok": True})

    async def _first_frame(self) -> dict[str, Any]:
        try:
            return await recv_frame(self.stream, self.decoder)
        except errors.ProtocolError:
            if self.server.tls is None and self.decoder.head(1) == bytes([TLS_RECORD_HANDSHAKE]):
                raise errors.ProtocolError(
                    "a TLS client reached a server without TLS (start it with --tls-cert/--tls-key)"
                ) from None
            raise

    async def _expect_tls(self) -> None:
        """Tell a plaintext cachefs client, in plaintext, that this server requires TLS."""
        first = await self.stream.socket.recv(1, socket.MSG_PEEK)
        if first and first[0] != TLS_RECORD_HANDSHAKE:
            try:  # take its hello first, so closing does not reset the reply away
                await recv_frame(self.stream, self.decoder)
            except errors.ProtocolError:
                pass
            raise errors.ProtocolError("this server requires TLS (--tls-ca/--tls-cert/--tls-key)")

    async def refuse(self, error: errors.CacheFsError) -> None:
        """Answer a connection we have no room for with `error` (after its hello), then close."""
        with trio.move_on_after(min(2.0, self.server.handshake_timeout)):
            try:
                if self.server.tls is not None:
                    self.stream = self.server.tls.wrap_server(self.stream)
                    await self.stream.do_handshake()
                await recv_frame(self.stream, self.decoder)
                await _send_now(self.stream, error_message(error))
            except (errors.CacheFsError, PeerClosed, OSError, trio.BrokenResourceError,
                    trio.ClosedResourceError):  # fmt: skip
                pass
        self.decoder.close()

    def close_with(self, error: errors.CacheFsError) -> None:
        """Stop reading, tell the peer `error`, and close (any calls in flight are cancelled)."""
        if self._closing is None:
            self._closing = error
        self._handshake_scope.cancel()
        self._reader_scope.cancel()

    def evict(self) -> None:
        """Close this (idle) connection to make room; it says why before hanging up."""
        self.close_with(
            _quiet("server busy: connection limit reached, closing the connection idle longest")
        )

    # -- reading requests ---------------------------------------------------------------------

    def _admit(self, size: int) -> None:
        """Charge a frame to the server's budget when its lengths arrive, or refuse it."""
        budget = self.server.budget
        if not budget.reserve(self, size):
            raise errors.Unavailable(
                f"server busy: {_mib(budget.used)} of requests buffered (cap "
                f"{_mib(budget.limit)}), no room for a {_mib(size)} request; retry later"
            )
        self._charges.append(size)

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        slots = self._slots
        table = self.server.connections
        try:
            # Deadlines are enforced from outside (RpcServer._sweep -> close_with), so the
            # receive path carries no per-call timer: it is the hot path.
            with self._reader_scope:
                while True:
                    data = await self._receive()
                    for header, payload in self.decoder.feed(data):
                        self.frame_started = None  # (waiting for a slot is not the peer's fault)
                        size = self._charges.popleft()
                        if type(header.get("id")) is not int:
                            raise errors.ProtocolError("request without an integer id")
                        try:
                            slots.acquire_nowait()
                        except trio.WouldBlock:  # in-flight cap: stop reading until one ends
                            await slots.acquire()
                        table.call_started(self)
                        nursery.start_soon(self._serve, header, payload, size)
                        del header, payload  # held by the call from now on, not by this loop
                    del data
                    if not self.decoder.buffered():
                        self.frame_started = None
                    elif self.frame_started is None:
                        self.frame_started = trio.current_time()
            raise self._closing or errors.Unavailable("closing")
        except errors.CacheFsError as e:
            # Say why before hanging up; the peer may be a confused client, not an attacker.
            await self.say_goodbye(e)
            raise

    async def _serve(self, header: dict[str, Any], payload: bytes, size: int) -> None:
        server = self.server
        try:
            reply = await server._dispatch(header, payload)
            del header, payload
            server.budget.release(self, size)  # the request is done with; its reply is not
            size = 0
            await self.send(reply)
        except LinkLost:
            pass
        finally:
            self._slots.release()
            server.budget.release(self, size)
            server.connections.call_finished(self, trio.current_time())
