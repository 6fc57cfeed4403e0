"""tests/store_proxy.py against the real moto server, with boto3 (and raw HTTP) as clients:
bytes through it, counts by kind, and each fault as a client sees it."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import boto3
import botocore.config
import botocore.exceptions
import pytest

from tests.store_proxy import StoreProxy

#: moto wants a signed-looking request and checks no signature.
AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request,"
        " SignedHeaders=host, Signature=0"}  # fmt: skip


def client(proxy: StoreProxy, retries: int = 1):
    config = botocore.config.Config(retries={"total_max_attempts": retries})
    return boto3.client(
        "s3", endpoint_url=f"http://{proxy.endpoint}", region_name="us-east-1", config=config
    )


@pytest.fixture(params=["thread", "subprocess"])
def proxy(request, moto_server):
    p = StoreProxy(moto_server.endpoint, subprocess=request.param == "subprocess")
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def bucket(moto_server):
    return moto_server.create_bucket()


def test_forwards_bytes_and_counts_by_kind(proxy, bucket, moto_server):
    s3 = client(proxy)
    objects = {"a.bin": b"", "dir/b c.bin": bytes(range(256)) * 300, "big": b"x" * (3 << 20)}
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    for key, data in objects.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert moto_server.client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert s3.head_object(Bucket=bucket, Key="big")["ContentLength"] == 3 << 20
    assert s3.get_object(Bucket=bucket, Key="big", Range="bytes=10-19")["Body"].read() == b"x" * 10
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")["Contents"]
    assert [o["Key"] for o in listed] == ["dir/b c.bin"]
    s3.delete_object(Bucket=bucket, Key="a.bin")
    assert proxy.counts() == {
        "requests": 10, "gets": 4, "heads": 1, "lists": 1, "others": 4,
        "failed": 0, "reset": 0, "stalled": 0,
    }  # fmt: skip
    assert proxy.gets() == {f"{bucket}/a.bin": 1, f"{bucket}/dir/b c.bin": 1, f"{bucket}/big": 2}
    proxy.reset_counts()
    assert proxy.counts()["requests"] == 0 and proxy.gets() == {}


def test_chunked_upload_expect_continue_and_kinds_on_one_connection(proxy, bucket):
    """One kept-alive connection: a chunked PUT that waits for 100 Continue, then requests of
    every kind, each answer framed so the next one parses."""
    host, port = proxy.endpoint.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("PUT", f"/{bucket}/chunked", body=iter([b"abc", b"defg"]),
                 headers={"Expect": "100-continue", **AUTH}, encode_chunked=True)  # fmt: skip
    put = conn.getresponse()
    assert put.status == 200, put.read()
    put.read()
    paths = {
        f"/{bucket}/chunked": ("gets", 200, b"abcdefg"),
        f"/{bucket}?list-type=2&prefix=ch": ("lists", 200, None),
        f"/{bucket}": ("lists", 200, None),  # ListObjects v1
        f"/{bucket}/chunked?tagging": ("others", 200, None),
        f"/{bucket}/chunked?versionId=null": ("gets", 200, b"abcdefg"),
        "/": ("others", 200, None),  # ListBuckets
    }
    for path, (kind, status, data) in paths.items():
        before = proxy.counts()[kind]
        conn.request("GET", path, headers=AUTH)
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status == status, (path, body)
        assert data is None or body == data
        assert proxy.counts()[kind] == before + 1, path
    conn.request("HEAD", f"/{bucket}/chunked", headers=AUTH)
    reply = conn.getresponse()
    assert reply.getheader("Content-Length") == "7" and reply.read() == b""
    conn.close()


def test_fail_rate_answers_slowdown(proxy, bucket):
    s3 = client(proxy)
    s3.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.set(fail_rate=0.3)
    seen = 0
    for _ in range(200):
        try:
            s3.get_object(Bucket=bucket, Key="k")["Body"].read()
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] == "SlowDown"
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            seen += 1
    assert 40 <= seen <= 80  # 30% of 200, seeded
    assert proxy.counts()["failed"] == seen
    with pytest.raises(botocore.exceptions.ClientError) as failed:  # a HEAD too, no body
        proxy.set(fail_rate=1.0)
        s3.head_object(Bucket=bucket, Key="k")
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    proxy.set(fail_rate=0.0)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"  # same connection


def test_reset_and_stop(proxy, bucket):
    s3 = client(proxy)
    s3.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.set(reset_rate=1.0)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.get_object(Bucket=bucket, Key="k")
    host, port = proxy.endpoint.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"GET /{bucket}/k HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):  # an RST, not an orderly close
            raw.recv(100)
    assert proxy.counts()["reset"] == 2
    proxy.set(reset_rate=0.0)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    kept = http.client.HTTPConnection(host, int(port), timeout=10)
    kept.request("HEAD", f"/{bucket}/k")
    kept.getresponse().read()
    proxy.stop()  # the store vanishes: kept-alive connections die, new ones are refused
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        kept.request("HEAD", f"/{bucket}/k")
        kept.getresponse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=10)
    assert proxy.counts()["reset"] == 2 and proxy.gets()  # still readable


def test_stall_holds_one_answer_while_others_flow(proxy, bucket):
    s3 = client(proxy)
    s3.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.set(stall_rate=1.0, stall_seconds=2.0)
    stalled: list[float] = []

    def read() -> None:
        t = time.monotonic()
        client(proxy).get_object(Bucket=bucket, Key="k")["Body"].read()
        stalled.append(time.monotonic() - t)

    waiting = threading.Thread(target=read)
    waiting.start()
    deadline = time.monotonic() + 10
    while proxy.counts()["stalled"] == 0:  # the request arrived and is held
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proxy.set(stall_rate=0.0)
    t = time.monotonic()
    for _ in range(20):
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"
    assert time.monotonic() - t < 1.5 and waiting.is_alive()
    waiting.join(10)
    assert 2.0 <= stalled[0] < 3.5


def test_delay_before_each_answer(proxy, bucket):
    s3 = client(proxy)
    s3.put_object(Bucket=bucket, Key="k", Body=b"data")
    proxy.set(delay=0.25)
    for _ in range(2):
        t = time.monotonic()
        s3.head_object(Bucket=bucket, Key="k")
        assert time.monotonic() - t >= 0.25
    assert proxy.set(delay=0.0)["delay"] == 0.0
    t = time.monotonic()
    s3.head_object(Bucket=bucket, Key="k")
    assert time.monotonic() - t < 0.25


def test_unknown_fault_is_refused(moto_server):
    with pytest.raises(TypeError, match="unknown http faults"):
        StoreProxy(moto_server.endpoint, fail=0.5)


# --- protocol="tcp": a byte relay (HDFS) ------------------------------------------------------


@pytest.fixture
def echo_server():
    """A real TCP server that sends back what it gets (in one thread per connection)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def _exchange(relay: StoreProxy, payload: bytes) -> tuple[bytes, float]:
    host, port = relay.endpoint.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += conn.recv(1 << 16)
    return got, time.monotonic() - started


@pytest.mark.parametrize("mode", ["thread", "subprocess"])
def test_tcp_relay_delays_answers_and_caps_bandwidth(echo_server, mode):
    with StoreProxy(echo_server, protocol="tcp", subprocess=mode == "subprocess") as relay:
        got, _ = _exchange(relay, b"ping")
        assert got == b"ping"
        relay.set(delay=0.2)
        got, slow = _exchange(relay, b"ping")
        assert got == b"ping" and slow >= 0.2
        relay.set(delay=0.0, bandwidth=2_000_000)
        payload = bytes(range(256)) * 4096  # 1 MiB: half a second at 2 MB/s
        got, capped = _exchange(relay, payload)
        assert got == payload and capped >= 0.5
        counts = relay.counts()
        assert counts["connections"] == 3
        assert counts["bytes_up"] == counts["bytes_down"] == 8 + len(payload)


def test_tcp_relay_refuses_http_faults(echo_server):
    with pytest.raises(TypeError, match="unknown tcp faults"):
        StoreProxy(echo_server, protocol="tcp", fail_rate=0.1)
    with pytest.raises(ValueError, match="protocol is one of"):
        StoreProxy(echo_server, protocol="udp")
