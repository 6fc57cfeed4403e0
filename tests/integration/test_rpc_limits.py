"""RpcServer's resource limits over real sockets: idle and frame deadlines, the request byte
budget, the connection cap with eviction. Small limits make each one quick to reach."""

import random
import struct

import msgpack
import pytest
import trio
import trio.testing

from cachefs import errors, protocol
from cachefs.rpc import RpcClient, RpcServer, ServerLimits

MiB = 1 << 20
SECRET = b"limits-test-secret-0123456789"


class Handler:
    def __init__(self):
        self.release = trio.Event()

    async def rpc_echo(self, x):
        return x

    async def rpc_hold(self):
        await self.release.wait()
        return "released"


async def start(nursery, **limits):
    kw = {"max_buffered": 8 * MiB, "small_reserve": MiB, **limits}
    server = RpcServer(
        Handler(), name="test", secret=SECRET, max_frame=4 * MiB, limits=ServerLimits(**kw)
    )
    server.handler = server._methods["hold"].__self__
    return server, await nursery.start(server.serve, "127.0.0.1", 0)


async def authenticated(addr):
    """A raw stream past the hello and HMAC handshake, and its decoder."""
    stream = await trio.open_tcp_stream(*addr)
    decoder = protocol.FrameDecoder()
    await stream.send_all(b"".join(protocol.encode_frame(protocol.hello_message())))
    nonce = protocol.check_challenge(await next_frame(stream, decoder))
    await stream.send_all(b"".join(protocol.encode_frame(protocol.auth_message(SECRET, nonce))))
    protocol.check_auth_reply(await next_frame(stream, decoder))
    return stream, decoder


async def next_frame(stream, decoder):
    with trio.fail_after(5):
        while True:
            for header, _ in decoder.feed(b""):
                return header
            data = await stream.receive_some()
            if not data:
                raise EOFError
            decoder.feed(data)


async def settled(predicate):
    """Wait until `predicate()` holds (server state changes in its own tasks)."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - polling another task's state is the point
            await trio.sleep(0.01)


async def goodbye(stream, decoder, within=5.0):
    """The connection-level error the server sends before closing (the connection must close)."""
    headers = []
    with trio.fail_after(within):
        try:
            while data := await stream.receive_some():
                headers.extend(h for h, _ in decoder.feed(data))
        except trio.BrokenResourceError:
            pass
    [header] = headers
    return header["e"][0], header["e"][1]


async def test_idle_connections_are_closed_and_clients_reconnect_silently(nursery):
    server, addr = await start(nursery, idle_timeout=0.3)
    stream, decoder = await authenticated(addr)
    async with RpcClient(addr, secret=SECRET, pool_size=1) as client:
        assert await client.call("echo", x=1) == 1
        kind, message = await goodbye(stream, decoder)  # the raw one saw why
        assert (kind, message) == ("Unavailable", "closing connection idle for 0.3s")
        await settled(lambda: client._conns == [] and len(server.connections) == 0)
        assert await client.call("echo", x=2) == 2  # a fresh connection, no error


async def test_calls_racing_the_idle_close_never_fail(nursery):
    # Calls land just before, at and just after the server's idle deadline: one that meets a
    # closing connection is retried on a fresh one, so no caller ever sees the close.
    server, addr = await start(nursery, idle_timeout=0.05)
    opened = 0
    async with RpcClient(addr, secret=SECRET, pool_size=1) as client:
        for i in range(40):
            conn = client._conns[0] if client._conns else None
            assert await client.call("echo", x=i) == i
            opened += client._conns[0] is not conn
            # Odd rounds wait well past the deadline (the server surely closed), even rounds
            # race it; a loaded host delays the sweeper, so only the sure closes are counted on.
            await trio.sleep(0.3 if i % 2 else 0.045 + 0.01 * random.random())
    assert opened >= 5  # the server really did close connections under the client


async def test_a_call_in_flight_is_not_idle(nursery):
    server, addr = await start(nursery, idle_timeout=0.2)
    async with RpcClient(addr, secret=SECRET, pool_size=1) as client:
        async with trio.open_nursery() as n:
            n.start_soon(client.call, "hold")
            await trio.sleep(0.6)
            server.handler.release.set()
        assert len(client._conns) == 1  # the held call finished on the same connection


async def test_a_started_frame_must_finish_within_the_frame_timeout(nursery):
    server, addr = await start(nursery, frame_timeout=0.3)
    stream, decoder = await authenticated(addr)
    await stream.send_all(struct.pack(">II", 100, 0) + b"\x80" * 10)  # 10 of 100 bytes
    start_time = trio.current_time()
    kind, message = await goodbye(stream, decoder)
    assert 0.25 < trio.current_time() - start_time < 2
    assert kind == "TimedOut" and "not received within 0.3s" in message
    await settled(lambda: server.budget.used == 0)


async def test_frames_beyond_the_byte_budget_are_refused_before_their_body(nursery):
    server, addr = await start(nursery)  # large frames may hold 7 MiB together
    first, first_decoder = await authenticated(addr)
    header = msgpack.packb({"id": 1, "m": "echo", "a": {"x": 1}})
    claim = struct.pack(">II", len(header), 4 * MiB - 64 - len(header))  # just under max_frame
    await first.send_all(claim + header + bytes(MiB))
    await settled(lambda: server.budget.used >= 4 * MiB - 64)
    second, second_decoder = await authenticated(addr)
    await second.send_all(claim)  # just the lengths
    kind, message = await goodbye(second, second_decoder)
    assert kind == "Unavailable" and message.startswith("server busy: 4.0 MiB of requests")
    # Small calls still fit (they may use the reserve too).
    async with RpcClient(addr, secret=SECRET) as client:
        assert await client.call("echo", x="small") == "small"
    await first.aclose()
    await settled(lambda: not server.budget.used and not len(server.connections))


async def test_a_full_server_evicts_the_longest_idle_connection(nursery):
    server, addr = await start(nursery, max_connections=3)
    idle = [await authenticated(addr) for _ in range(3)]
    async with RpcClient(addr, secret=SECRET, pool_size=1) as client:
        assert await client.call("echo", x="in") == "in"
        kind, message = await goodbye(*idle[0])  # the oldest made room
        assert kind == "Unavailable" and "connection limit reached" in message
        assert len(server.connections) == 3


async def test_unauthenticated_connections_count_and_are_evicted_first_when_oldest(nursery):
    server, addr = await start(nursery, max_connections=2)
    silent = [await trio.open_tcp_stream(*addr) for _ in range(2)]
    await trio.testing.wait_all_tasks_blocked()
    assert len(server.connections) == 2
    async with RpcClient(addr, secret=SECRET, pool_size=1) as client:
        assert await client.call("echo", x=1) == 1
    with trio.fail_after(2):
        assert await silent[0].receive_some() == b""  # dropped, no error frame before hello


async def test_a_full_server_with_no_idle_connection_refuses_newcomers(nursery):
    server, addr = await start(nursery, max_connections=2)
    async with RpcClient(addr, secret=SECRET, pool_size=2) as busy, trio.open_nursery() as n:
        for _ in range(2):  # two connections, each with a call in flight
            n.start_soon(busy.call, "hold")
            await trio.testing.wait_all_tasks_blocked()
        assert len(server.connections) == 2
        assert all(server.connections.idle_since(c) is None for c in busy_conns(server))
        async with RpcClient(addr, secret=SECRET, name="master") as newcomer:
            with pytest.raises(errors.Unavailable, match="server busy: 2 connections open"):
                await newcomer.call("echo", x=1)
        server.handler.release.set()
    assert server.budget.used == 0


def busy_conns(server):
    return list(server.connections._in_flight)
