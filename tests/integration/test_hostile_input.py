"""Hostile network input against real master and worker processes: random and mutated frames,
oversized lengths, unknown methods, wrong argument types, paths escaping the dataset root.
The daemons must answer with errors or close that connection, and keep serving everyone else.
"""

from __future__ import annotations

import secrets
import socket
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.config import parse_address
from cachefs.errors import InvalidArgument
from cachefs.protocol import (
    PROTOCOL_VERSION,
    auth_message,
    check_auth_reply,
    check_challenge,
    encode_frame,
)
from tests.procs import master_process, run_cli, worker_process

#: The daemons require this shared secret, so hostile input arrives after a valid handshake too.
SECRET = secrets.token_hex(16).encode()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    source = tmp / "source"
    source.mkdir()
    (source / "ok.bin").write_bytes(b"fine" * 100)
    (tmp / "secret-outside.bin").write_bytes(b"must never be served")
    secret_file = tmp / "secret"
    secret_file.write_bytes(SECRET)
    secret_file.chmod(0o600)
    auth = ("--secret-file", str(secret_file))
    master = master_process(tmp, *auth)
    master.start()
    worker = worker_process(tmp, master.address, "w1", "64M", *auth)
    try:
        worker.start()
        assert run_cli("dataset", "add", "ds", source.as_uri(), "--master",
                       master.address, *auth).returncode == 0  # fmt: skip
        yield {"master": master, "worker": worker, "auth": auth}
    finally:
        worker.stop()
        master.stop()


def raw(header: dict, payload: bytes = b"") -> bytes:
    return b"".join(bytes(b) for b in encode_frame(header, payload))


def exchange(
    address: str,
    data: bytes,
    *,
    handshake: bool = True,
    wait_reply: bool = False,
    timeout: float = 5.0,
) -> bytes:
    """Sends `data` (after a valid handshake if asked) and returns whatever comes back.

    With `wait_reply` the connection stays open until one whole frame has arrived; otherwise
    the write side is closed at once and everything until the server closes is returned.
    """  # fmt: skip
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if handshake:
            sock.sendall(raw({"hello": "cachefs", "v": PROTOCOL_VERSION}))
            nonce = check_challenge(_read_frame(sock))
            if nonce is not None:
                sock.sendall(raw(auth_message(SECRET, nonce)))
                check_auth_reply(_read_frame(sock))
        sock.sendall(data)
        if not wait_reply:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if wait_reply and _frames(received):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return received


def _read_frame(sock: socket.socket) -> dict:
    data = b""
    while not (frames := _frames(data)):
        chunk = sock.recv(65536)
        assert chunk, "closed during the handshake"
        data += chunk
    return frames[0][0]


def still_serving(daemons) -> None:
    """A well-behaved client still gets correct answers from both daemons."""
    listed = run_cli("dataset", "ls", "--master", daemons["master"].address, *daemons["auth"])
    assert listed.returncode == 0 and "ds" in listed.stdout
    assert daemons["master"].proc.poll() is None and daemons["worker"].proc.poll() is None


methods = st.sampled_from(
    ["lookup", "readdir", "read", "getattr", "stats", "prefetch", "dataset_add", "load_start",
     "nope", "", "__init__", "rpc_read"]
)  # fmt: skip
int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
scalars = st.none() | st.booleans() | int64 | st.floats() | st.text(max_size=20)
values = st.recursive(
    scalars | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    target=st.sampled_from(["master", "worker"]),
    method=methods,
    args=st.dictionaries(st.text(max_size=10), values, max_size=5),
    request_id=st.one_of(int64, st.text(max_size=5), st.none()),
)
def test_random_requests_get_errors_not_crashes(daemons, target, method, args, request_id):
    frame = raw({"id": request_id, "m": method, "a": args, "t": 2.0})
    exchange(daemons[target].address, frame)
    assert daemons[target].proc.poll() is None


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    target=st.sampled_from(["master", "worker"]),
    noise=st.binary(min_size=1, max_size=300),
    flips=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
    handshake=st.booleans(),
)
def test_garbage_and_mutated_frames(daemons, target, noise, flips, handshake):
    valid = bytearray(raw({"id": 1, "m": "stats", "a": {}, "t": 2.0}))
    for position in flips:
        valid[position % len(valid)] ^= 0xFF
    exchange(daemons[target].address, bytes(valid) + noise, handshake=handshake)
    assert daemons[target].proc.poll() is None


def test_oversized_and_lying_length_fields(daemons):
    for target in ("master", "worker"):
        address = daemons[target].address
        exchange(address, struct.pack(">II", 0xFFFFFFFF, 0xFFFFFFFF) + b"x" * 100)
        exchange(address, struct.pack(">II", 10, 1 << 31))
        exchange(address, struct.pack(">II", 5, 0) + b"\xc1\xc1\xc1\xc1\xc1")  # invalid msgpack
        exchange(address, struct.pack(">II", 100, 0) + b"short")  # never completes
        exchange(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", handshake=False)
    still_serving(daemons)


@pytest.mark.parametrize("path", ["../secret-outside.bin", "/etc/passwd", "ok.bin/../../x",
                                  "a\0b", "./../secret-outside.bin"])  # fmt: skip
def test_paths_escaping_the_dataset_root_are_rejected(daemons, path):
    request = raw({"id": 7, "m": "read", "a": {"dataset": "ds", "path": path, "size": 20,
                   "mtime_ns": 1, "offset": 0, "length": 20}, "t": 5.0})  # fmt: skip
    reply = exchange(daemons["worker"].address, request, wait_reply=True)
    assert b"must never be served" not in reply
    answer = next(h for h, _ in _frames(reply) if h.get("id") == 7)
    assert answer["e"][0] == InvalidArgument.__name__, answer
    still_serving(daemons)


def _frames(data: bytes) -> list[tuple[dict, bytes]]:
    """The complete frames at the start of `data`."""
    out = []
    while len(data) >= 8:
        header_len, payload_len = struct.unpack(">II", data[:8])
        if len(data) < 8 + header_len + payload_len:
            break
        header = msgpack.unpackb(data[8 : 8 + header_len], raw=False, strict_map_key=False)
        out.append((header, data[8 + header_len : 8 + header_len + payload_len]))
        data = data[8 + header_len + payload_len :]
    return out


def test_daemons_survive_everything(daemons):
    still_serving(daemons)
