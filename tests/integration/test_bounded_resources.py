"""A real master process under a memory and connection attack keeps serving within bounds.

100 authenticated connections each announce a 64 MiB request, send 60 MiB of it and stall;
1,000 more authenticated connections sit idle. Meanwhile a normal client polls `dataset_list`
and `status`. The master's RSS must stay under `RSS_CAP_MIB` and come back once the attackers
give up, and every poll must be answered.

Rerun with the numbers printed: ``.venv/bin/pytest -s tests/integration/test_bounded_resources.py``
"""

from __future__ import annotations

import os
import resource
import secrets
import struct
from pathlib import Path

import msgpack
import trio

from cachefs import protocol
from cachefs.config import parse_address
from cachefs.rpc import RpcClient
from tests.procs import master_process

MiB = 1 << 20
ATTACKERS = 100
IDLE = 1000
CLAIMED = 64 * MiB  # what each attacker's frame header announces
SENT = 60 * MiB  # what it actually sends before stalling
HOLD = 5.0  # seconds the attackers stall before they give up
#: The master's RSS ceiling during the attack (measured peak ~145 MiB; docs/security-rpc.md).
RSS_CAP_MIB = 250
#: How far above its pre-attack RSS the master may stay once the attack is over.
RSS_SLACK_MIB = 40


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE + ATTACKERS + 500
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))


async def authenticated(address, secret: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*address)
    decoder = protocol.FrameDecoder()

    async def frame():
        while True:
            for header, _ in decoder.feed(b""):
                return header
            data = await stream.receive_some()
            if not data:
                raise EOFError("closed during handshake")
            decoder.feed(data)

    await stream.send_all(b"".join(protocol.encode_frame(protocol.hello_message())))
    nonce = protocol.check_challenge(await frame())
    await stream.send_all(b"".join(protocol.encode_frame(protocol.auth_message(secret, nonce))))
    protocol.check_auth_reply(await frame())
    return stream


class Attack:
    def __init__(self, address, secret):
        self.address, self.secret = address, secret
        self.idle: list[trio.SocketStream] = []
        self.refused = 0  # attackers the master hung up on
        self.stalled = 0  # attackers that sent all 60 MiB and are holding
        self.give_up = trio.Event()
        self.done_sending = 0
        self.connected = 0
        self.all_connected = trio.Event()

    async def open_idle(self, n: int) -> None:
        async def one():
            self.idle.append(await authenticated(self.address, self.secret))

        for start in range(0, n, 100):  # in batches: a realistic crowd, not one SYN flood
            async with trio.open_nursery() as nursery:
                for _ in range(min(100, n - start)):
                    nursery.start_soon(one)

    async def attacker(self, chunk: bytes) -> None:
        try:
            stream = await authenticated(self.address, self.secret)
        except (OSError, EOFError, trio.BrokenResourceError):
            self.refused += 1  # no room even to start
            self.done_sending += 1
            return
        # All connect first, then all send: 1,100 connections at once exceed the master's cap.
        self.connected += 1
        if self.connected == ATTACKERS:
            self.all_connected.set()
        await self.all_connected.wait()
        try:
            header = msgpack.packb({"id": 1, "m": "status", "a": {}})
            prefix = struct.pack(">II", len(header), CLAIMED - 8 - len(header))
            await stream.send_all(prefix + header)
            for _ in range(SENT // len(chunk)):
                await stream.send_all(chunk)
            self.stalled += 1
        except (OSError, trio.BrokenResourceError):
            self.refused += 1
        finally:
            self.done_sending += 1
        await self.give_up.wait()
        await stream.aclose()


async def poll(address, secret, answered: list, failures: list, stop: trio.Event) -> None:
    """A normal client: a pooled RpcClient and, every other round, a brand-new one."""
    async with RpcClient(address, secret=secret, name="master", timeout=10) as pooled:
        i = 0
        while not stop.is_set():
            started = trio.current_time()
            try:
                if i % 2:
                    async with RpcClient(address, secret=secret, name="master") as fresh:
                        await fresh.call("dataset_list")
                else:
                    await pooled.call("status")
                answered.append(trio.current_time() - started)  # latency
            except Exception as e:  # recorded, asserted on at the end
                failures.append(f"{type(e).__name__}: {e}")
            i += 1
            await trio.sleep(0.2)


async def attack_and_measure(address, pid: int, secret: bytes) -> dict:
    """Runs the attack against a master at `address` (process `pid`); returns what it saw."""
    async with RpcClient(address, secret=secret) as client:
        for _ in range(20):  # warm up code paths before the baseline
            await client.call("status")
            await client.call("dataset_list")
    await trio.sleep(0.5)
    baseline = rss_mib(pid)
    samples: list[float] = []
    answered: list[float] = []
    failures: list[str] = []
    stop = trio.Event()
    attack = Attack(address, secret)

    async def sample():
        while not stop.is_set():
            samples.append(rss_mib(pid))
            await trio.sleep(0.05)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        nursery.start_soon(poll, address, secret, answered, failures, stop)
        await attack.open_idle(IDLE)
        idle_opened = trio.current_time() - start
        chunk = bytes(MiB)
        for _ in range(ATTACKERS):
            nursery.start_soon(attack.attacker, chunk)
        with trio.fail_after(60):
            while attack.done_sending < ATTACKERS:  # noqa: ASYNC110 - watching peers
                await trio.sleep(0.1)
        await trio.sleep(HOLD)  # the stalled attackers hold their buffers for a while
        peak = max(samples)
        polls_during = len(answered)
        attack.give_up.set()
        # The attackers are gone; the master should hand their memory back.
        with trio.move_on_after(15):
            while rss_mib(pid) > baseline + RSS_SLACK_MIB:  # noqa: ASYNC110
                await trio.sleep(0.2)
        after_attack = rss_mib(pid)
        evicted = 0
        for stream in attack.idle:  # the ones the master closed to make room have said so
            with trio.move_on_after(0.001):
                evicted += bool(await stream.receive_some()) or 1
            await stream.aclose()
        await trio.sleep(1)
        after_all = rss_mib(pid)
        stop.set()
    result = {
        "baseline": baseline, "peak": peak, "after_attack": after_attack, "after_all": after_all,
        "refused": attack.refused, "stalled": attack.stalled, "idle_opened_s": idle_opened,
        "answered": len(answered), "answered_during": polls_during, "failures": failures,
        "evicted": evicted, "slowest_poll": max(answered, default=0.0),
        "seconds": trio.current_time() - start,
    }  # fmt: skip
    print(
        f"\nmaster RSS MiB: baseline {baseline:.0f}, peak {peak:.0f}, after the attackers "
        f"left {after_attack:.0f}, after the idle ones too {after_all:.0f}; attackers refused "
        f"{attack.refused}, stalled {attack.stalled}; {IDLE} idle opened in {idle_opened:.1f}s, "
        f"{evicted} of them evicted to make room;"
        f" {len(answered)} polls answered ({polls_during} during the attack, slowest "
        f"{max(answered, default=0) * 1000:.0f} ms), "
        f"{len(failures)} failed; total {result['seconds']:.0f}s"
    )
    return result


async def test_master_memory_and_connections_stay_bounded_under_attack(tmp_path):
    raise_nofile()
    secret_file = tmp_path / "secret"
    secret_file.write_text(secrets.token_hex(16))
    os.chmod(secret_file, 0o600)
    secret = secret_file.read_bytes().strip()
    master = master_process(tmp_path, "--secret-file", str(secret_file))
    master.start()
    try:
        seen = await attack_and_measure(parse_address(master.address), master.proc.pid, secret)
        assert not seen["failures"], seen["failures"][:5]
        assert seen["answered_during"] >= 10
        assert seen["peak"] < RSS_CAP_MIB, f"peak RSS {seen['peak']:.0f} MiB"
        assert seen["stalled"] <= 2, "the byte budget admitted more 64 MiB frames than it has"
        assert seen["after_attack"] < seen["baseline"] + RSS_SLACK_MIB, seen
        assert master.proc.poll() is None
    finally:
        master.stop()
