"""RpcServer and RpcClient over real TCP on 127.0.0.1."""

import errno
import functools
import logging
import socket
import struct

import msgpack
import pytest
import trio
import trio.testing

from cachefs import errors, protocol
from cachefs.config import parse_address
from cachefs.rpc import Reply, RpcClient, RpcServer


class Handler:
    def __init__(self):
        self.slow_cancelled = trio.Event()
        self.slow_started = trio.Event()
        self.gate_count = 0
        self.gate_target = 0
        self.gate_open = trio.Event()
        self.max_seen = 0

    async def rpc_echo(self, x, payload=b""):
        return Reply(x, payload) if payload else x

    async def rpc_missing(self, path):
        raise errors.NotFound(f"no such file: {path}")

    async def rpc_crash(self):
        raise RuntimeError("boom")

    async def rpc_nursery_error(self):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.rpc_missing, "in/nursery")

    async def rpc_unsendable(self):
        return object()

    async def rpc_slow(self):
        self.slow_started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.slow_cancelled.set()

    async def rpc_budget(self):
        return trio.current_effective_deadline() - trio.current_time()

    async def rpc_gate(self, i):
        """Blocks until `gate_target` calls are inside at once."""
        self.gate_count += 1
        self.max_seen = max(self.max_seen, self.gate_count)
        if self.gate_count >= self.gate_target:
            self.gate_open.set()
        await self.gate_open.wait()
        self.gate_count -= 1
        return i

    async def not_exposed(self):
        return "secret"


@pytest.fixture
def handler():
    return Handler()


async def start_server(nursery, handler, **kw):
    return await nursery.start(RpcServer(handler, name="test", **kw).serve, "127.0.0.1", 0)


@pytest.fixture
async def addr(nursery, handler):
    return await start_server(nursery, handler)


async def raw_connect(addr, hello=True):
    stream = await trio.open_tcp_stream(*addr)
    decoder = protocol.FrameDecoder()
    if hello:
        await stream.send_all(b"".join(protocol.encode_frame(protocol.hello_message())))
        challenge = {"v": protocol.PROTOCOL_VERSION, "nonce": None}
        assert await read_frames(stream, decoder, until_eof=False) == [challenge]
    return stream, decoder


async def read_frames(stream, decoder, until_eof=True):
    """Headers received until EOF (or until the first frame when until_eof is False)."""
    got = []
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some()
            if not data:
                return got
            got.extend(h for h, _ in decoder.feed(data))
            if got and not until_eof:
                return got


async def test_thousand_concurrent_calls_over_one_connection(addr):
    sizes = [0, 1, 100, 65535, 65536, 200_000, 1 << 20]
    results = {}

    async with RpcClient(addr, pool_size=1) as client:

        async def one(i):
            payload = bytes([i % 256]) * sizes[i % len(sizes)] if i % 3 == 0 else b""
            value, got = await client.call_with_payload(
                "echo", x={"n": i, "s": str(i)}, payload=payload
            )
            results[i] = (value, got == payload)

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        [conn] = client._conns
        assert conn._last_id == 1000  # every call went over this one connection
    assert results == {i: ({"n": i, "s": str(i)}, True) for i in range(1000)}


async def test_calls_really_run_concurrently_up_to_the_cap(nursery, handler):
    addr = await start_server(nursery, handler, max_in_flight=8)
    handler.gate_target = 8
    async with RpcClient(addr, pool_size=1) as client:
        out = []

        async def one(i):
            out.append(await client.call("gate", i=i, timeout=10))

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
    assert sorted(out) == list(range(20))
    assert handler.max_seen == 8  # all 8 slots used at once, never more


async def test_large_payload_round_trip(addr):
    payload = bytes(range(256)) * (32 << 12)  # 8 MiB
    async with RpcClient(addr) as client:
        value, got = await client.call_with_payload("echo", x=1, payload=memoryview(payload))
    assert value == 1 and got == payload


async def test_remaining_budget_is_sent_to_the_server(addr):
    async with RpcClient(addr, timeout=30) as client:
        assert 29 < await client.call("budget") <= 30
        assert 1 < await client.call("budget", timeout=2) <= 2


@pytest.mark.parametrize("after_handshake", [False, True])
async def test_oversized_frame_closes_only_that_connection(addr, after_handshake):
    stream, decoder = await raw_connect(addr, hello=after_handshake)
    await stream.send_all(struct.pack(">II", 100, protocol.MAX_FRAME))
    headers = await read_frames(stream, decoder)
    assert [h["e"][0] for h in headers] == ["ProtocolError"]
    assert "bad frame size" in headers[0]["e"][1]
    async with RpcClient(addr) as client:
        assert await client.call("echo", x="still serving") == "still serving"


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        struct.pack(">II", 3, 0) + b"\xc1\xc1\xc1",
        struct.pack(">II", 4, 0) + msgpack.packb([1, 2, 3]),
        b"".join(protocol.encode_frame({"m": "echo", "a": {"x": 1}})),  # no request id
    ],
)
async def test_garbage_closes_only_that_connection(addr, garbage):
    async with RpcClient(addr, pool_size=1) as client:
        assert await client.call("echo", x=1) == 1
        stream, decoder = await raw_connect(addr)
        await stream.send_all(garbage)
        headers = await read_frames(stream, decoder)
        assert [h["e"][0] for h in headers] == ["ProtocolError"]
        assert "id" not in headers[0]
        # The other client's connection was not disturbed.
        conn = client._conns[0]
        assert await client.call("echo", x=2) == 2
        assert client._conns == [conn]


async def test_garbage_before_handshake(addr):
    stream, decoder = await raw_connect(addr, hello=False)
    await stream.send_all(b"".join(protocol.encode_frame({"hello": "nope"})))
    headers = await read_frames(stream, decoder)
    assert headers[0]["e"][:2] == ["ProtocolError", "not a cachefs client"]


async def test_version_mismatch_is_reported_then_closed(addr):
    stream, decoder = await raw_connect(addr, hello=False)
    hello = {"hello": "cachefs", "v": protocol.PROTOCOL_VERSION + 1}
    await stream.send_all(b"".join(protocol.encode_frame(hello)))
    headers = await read_frames(stream, decoder)
    assert headers[0]["e"][0] == "ProtocolError"
    assert "version mismatch" in headers[0]["e"][1]


async def test_silent_connection_is_dropped_after_handshake_timeout(nursery, handler):
    addr = await start_server(nursery, handler, handshake_timeout=0.2)
    stream = await trio.open_tcp_stream(*addr)
    with trio.fail_after(5):
        assert await stream.receive_some() == b""


async def test_unknown_method_and_bad_args_keep_the_connection(addr):
    async with RpcClient(addr, pool_size=1) as client:
        assert await client.call("echo", x=0) == 0
        conn = client._conns[0]
        with pytest.raises(errors.InvalidArgument, match="unknown method 'nope'") as info:
            await client.call("nope")
        assert info.value.errno == errno.EINVAL
        with pytest.raises(errors.InvalidArgument, match="unknown method"):
            await client.call("not_exposed")
        with pytest.raises(errors.InvalidArgument, match="bad arguments for 'echo'"):
            await client.call("echo", y=1)
        with pytest.raises(errors.InvalidArgument, match="bad arguments"):
            await client.call("missing", payload=b"unexpected", path="p")
        assert await client.call("echo", x=3) == 3
        assert client._conns == [conn]


async def test_handler_errors_travel_by_kind(addr, caplog):
    async with RpcClient(addr) as client:
        with pytest.raises(errors.NotFound) as info:
            await client.call("missing", path="a/b.jpg")
        assert info.value.message == "no such file: a/b.jpg"
        assert info.value.errno == errno.ENOENT

        with pytest.raises(errors.NotFound, match="in/nursery"):
            await client.call("nursery_error")

        caplog.set_level(logging.ERROR, logger="cachefs.rpc")
        with pytest.raises(errors.CacheFsError) as info:
            await client.call("crash")
        assert type(info.value) is errors.CacheFsError
        assert "internal error" in info.value.message and "boom" in info.value.message
        assert info.value.errno == errno.EIO
        assert any(r.exc_info and "crash" in r.getMessage() for r in caplog.records)

        with pytest.raises(errors.CacheFsError, match="internal error"):
            await client.call("unsendable")

        assert await client.call("echo", x="alive") == "alive"


async def test_shared_secret(nursery, handler):
    addr = await start_server(nursery, handler, secret=b"right")
    async with RpcClient(addr, secret=b"right") as client:
        assert await client.call("echo", x=1) == 1
    async with RpcClient(addr, secret=b"wrong", name="master") as client:
        with pytest.raises(errors.AuthenticationFailed, match=r"master at .*: authentication"):
            await client.call("echo", x=1)
    async with RpcClient(addr, name="master") as client:
        with pytest.raises(errors.AuthenticationFailed, match="credentials missing") as info:
            await client.call("echo", x=1)
        assert info.value.errno == errno.EACCES
    async with RpcClient(addr, secret=b"right") as client:  # failures left nothing behind
        assert await client.call("echo", x=2) == 2


async def test_client_secret_is_harmless_when_server_has_none(addr):
    async with RpcClient(addr, secret=b"anything") as client:
        assert await client.call("echo", x=1) == 1


async def test_deadline_times_out_quickly_and_keeps_the_connection(addr, handler):
    async with RpcClient(addr, pool_size=1) as client:
        assert await client.call("echo", x=1) == 1
        conn = client._conns[0]
        start = trio.current_time()
        with pytest.raises(
            errors.TimedOut, match=r"slow to 127\.0\.0\.1:\d+ timed out after 0\.2s"
        ):
            await client.call("slow", timeout=0.2)
        assert trio.current_time() - start < 1.0
        # The server applied the same budget to the handler.
        with trio.fail_after(5):
            await handler.slow_cancelled.wait()
        assert await client.call("echo", x=2) == 2
        assert client._conns == [conn]


async def start_stoppable(nursery, handler, port=0):
    """A server in its own cancel scope, so a test can stop it: returns (addr, scope)."""
    scope = trio.CancelScope()

    async def run(task_status):
        with scope:
            await RpcServer(handler, name="test").serve("127.0.0.1", port, task_status=task_status)

    return await nursery.start(run), scope


async def test_in_flight_calls_fail_when_the_server_goes_away(nursery, handler):
    addr, server = await start_stoppable(nursery, handler)

    async def stop_when_started():
        await handler.slow_started.wait()
        server.cancel()

    nursery.start_soon(stop_when_started)
    async with RpcClient(addr, pool_size=1) as client:
        with pytest.raises(errors.Unavailable) as info:
            await client.call("slow", timeout=10)
    assert not isinstance(info.value, errors.TimedOut)
    assert "127.0.0.1" in info.value.message


async def test_reconnects_to_a_restarted_server(nursery, handler):
    addr, server = await start_stoppable(nursery, handler)
    async with RpcClient(addr, pool_size=2) as client:
        assert await client.call("echo", x=1) == 1
        server.cancel()
        await trio.testing.wait_all_tasks_blocked()  # the client sees the connection drop
        assert client._conns == []
        with pytest.raises(errors.Unavailable, match="cannot reach"):
            await client.call("echo", x=2)
        assert (await start_stoppable(nursery, handler, port=addr[1]))[0] == addr
        assert await client.call("echo", x=3) == 3


async def start_flaky_server(nursery):
    """A protocol-level fake whose FIRST connection drops on a request for x="drop", as a
    restarted peer's old connection would. Returns (addr, connection counter)."""
    accepted = []

    async def handle(stream):
        accepted.append(stream)
        first = len(accepted) == 1
        decoder = protocol.FrameDecoder()
        while data := await stream.receive_some():
            for header, _ in decoder.feed(data):
                if "hello" in header:
                    reply = protocol.challenge_message(None)
                elif first and header["a"]["x"] == "drop":
                    return
                else:
                    reply = {"id": header["id"], "r": header["a"]["x"]}
                await stream.send_all(b"".join(protocol.encode_frame(reply)))

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[:2], accepted


async def test_dead_pooled_connection_is_retried_once_on_a_fresh_one(nursery):
    addr, accepted = await start_flaky_server(nursery)
    async with RpcClient(addr, pool_size=1) as client:
        assert await client.call("echo", x=1) == 1
        assert await client.call("echo", x="drop") == "drop"  # answered on a new connection
    assert len(accepted) == 2


async def test_a_call_on_its_own_fresh_connection_is_not_retried(nursery):
    addr, accepted = await start_flaky_server(nursery)
    async with RpcClient(addr, pool_size=1) as client:
        with pytest.raises(errors.Unavailable, match="lost: closed by peer"):
            await client.call("echo", x="drop")
    assert len(accepted) == 1


async def test_closed_port_is_unavailable_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = trio.current_time()
    async with RpcClient(("127.0.0.1", port), name="master") as client:
        with pytest.raises(errors.Unavailable) as info:
            await client.call("echo", x=1)
    assert trio.current_time() - start < 2.0
    assert not isinstance(info.value, errors.TimedOut)
    assert info.value.message == f"cannot reach master at 127.0.0.1:{port}: connection refused"


async def test_calls_after_close_are_unavailable(addr):
    async with RpcClient(addr) as client:
        assert await client.call("echo", x=1) == 1
        await client.aclose()
        with pytest.raises(errors.Unavailable):
            await client.call("echo", x=1)


async def test_client_outside_async_with_is_a_usage_error(addr):
    with pytest.raises(RuntimeError, match="async with"):
        await RpcClient(addr).call("echo", x=1)


def test_parse_address():
    assert parse_address("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address(("h", "7")) == ("h", 7)
    with pytest.raises(errors.InvalidArgument):
        parse_address("nohost")


def test_sync_handler_methods_are_refused():
    class Bad:
        def rpc_sync(self):
            return 1

    with pytest.raises(TypeError, match="async def"):
        RpcServer(Bad())
