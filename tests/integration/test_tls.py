"""TLS between RpcServer and RpcClient over real sockets, with certificates made per test run.

Every node has a certificate signed by the cluster CA (mutual TLS); the shared secret is still
checked inside TLS. Failures must be one line, name the peer, and never hang.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from cachefs import errors
from cachefs.rpc import Reply, RpcClient, RpcServer
from cachefs.tls import TlsConfig
from cachefs.workers import WorkerDirectory

SECRET = b"0123456789abcdef0123456789abcdef"


class Echo:
    async def rpc_echo(self, x, payload=b""):
        return Reply(x, payload) if payload else x


class Certs:
    """A cluster CA, a stranger CA, and PEM files for nodes signed by either."""

    def __init__(self, path):
        self.path = path
        self.ca, self.other = trustme.CA(), trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem)
        self.other_ca_file = self._write("other-ca.pem", self.other.cert_pem)

    def _write(self, name, blob):
        path = self.path / name
        blob.write_to_path(str(path))
        return str(path)

    def node(self, name, ca=None):
        """(cert file, key file) for a node; its certificate names 127.0.0.1."""
        issued = (ca or self.ca).issue_cert("127.0.0.1", f"{name}.cluster")
        cert = self.path / f"{name}.pem"
        for blob in issued.cert_chain_pems:  # leaf first, then any intermediates
            blob.write_to_path(str(cert), append=cert.exists())
        return str(cert), self._write(f"{name}.key", issued.private_key_pem)

    def config(self, name, ca_file=None, ca=None):
        cert, key = self.node(name, ca)
        return TlsConfig.from_files(cert, key, ca_file or self.ca_file)


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path)


async def tls_server(nursery, certs, **kw):
    server = RpcServer(Echo(), name="test", secret=SECRET, tls=certs.config("server"), **kw)
    return await nursery.start(server.serve, "127.0.0.1", 0)


async def call_fails(addr, tls, *, secret=SECRET):
    """The error a one-call client gets; the call must fail fast, not hang."""
    async with RpcClient(addr, secret=secret, tls=tls, name="master") as client:
        with trio.fail_after(5), pytest.raises(errors.CacheFsError) as info:
            await client.call("echo", x=1)
    assert "\n" not in info.value.message
    return info.value


async def test_mutual_tls_round_trip_with_secret_inside(nursery, certs):
    addr = await tls_server(nursery, certs)
    async with RpcClient(addr, secret=SECRET, tls=certs.config("client"), pool_size=1) as client:
        payload = bytes(range(256)) * 8192  # 2 MiB: many TLS records
        value, got = await client.call_with_payload("echo", x="hi", payload=payload)
        assert (value, got) == ("hi", payload)
        stream = client._conns[0].stream
        assert isinstance(stream, trio.SSLStream)
        assert stream.version() in ("TLSv1.2", "TLSv1.3")
    # The secret is still required inside TLS.
    error = await call_fails(addr, certs.config("client2"), secret=b"wrong-secret-wrong-secret")
    assert isinstance(error, errors.AuthenticationFailed)


async def test_client_without_the_cluster_ca_refuses_the_server(nursery, certs):
    addr = await tls_server(nursery, certs)
    cert, key = certs.node("client")
    error = await call_fails(addr, TlsConfig.from_files(cert, key, None))  # system CAs only
    assert isinstance(error, errors.AuthenticationFailed)
    assert error.message.startswith(f"TLS handshake with master at {addr[0]}:{addr[1]} failed:")
    assert "certificate verify failed" in error.message


async def test_client_with_a_stranger_cert_is_refused(nursery, certs):
    addr = await tls_server(nursery, certs)
    error = await call_fails(addr, certs.config("stranger", ca=certs.other))
    assert isinstance(error, errors.AuthenticationFailed)
    assert "stranger.pem rejected" in error.message


async def test_client_without_a_cert_is_refused(nursery, certs):
    addr = await tls_server(nursery, certs)
    error = await call_fails(addr, TlsConfig.from_files(ca=certs.ca_file))
    assert isinstance(error, errors.AuthenticationFailed)
    assert "require a client certificate" in error.message


async def test_server_without_a_ca_accepts_clients_without_certs(nursery, certs):
    cert, key = certs.node("server")
    server = RpcServer(Echo(), tls=TlsConfig.from_files(cert, key))
    addr = await nursery.start(server.serve, "127.0.0.1", 0)
    async with RpcClient(addr, tls=TlsConfig.from_files(ca=certs.ca_file)) as client:
        assert await client.call("echo", x=3) == 3


async def test_plaintext_client_against_tls_server_fails_cleanly(nursery, certs):
    addr = await tls_server(nursery, certs)
    start = trio.current_time()
    error = await call_fails(addr, None)
    assert trio.current_time() - start < 2
    assert isinstance(error, errors.ProtocolError)
    assert error.message == f"master at {addr[0]}:{addr[1]}: this server requires TLS " \
                            "(--tls-ca/--tls-cert/--tls-key)"  # fmt: skip


async def test_tls_client_against_plaintext_server_fails_cleanly(nursery, certs):
    addr = await nursery.start(RpcServer(Echo()).serve, "127.0.0.1", 0)
    start = trio.current_time()
    error = await call_fails(addr, certs.config("client"))
    assert trio.current_time() - start < 2
    assert isinstance(error, errors.ProtocolError)
    assert "does that server use TLS?" in error.message


async def test_tls_handshake_is_under_the_handshake_timeout(nursery, certs):
    addr = await tls_server(nursery, certs, handshake_timeout=0.3)
    # Silent after TCP connect, and silent in the middle of a ClientHello.
    for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01"):
        stream = await trio.open_tcp_stream(*addr)
        await stream.send_all(first_bytes)
        with trio.fail_after(3):
            while await stream.receive_some():
                pass
        await stream.aclose()
    # A client that stalls after the TLS handshake (never says hello) is dropped too.
    raw = await trio.open_tcp_stream(*addr)
    ssl_stream = certs.config("slow").wrap_client(raw, addr[0])
    await ssl_stream.do_handshake()
    with trio.fail_after(3):
        try:
            assert await ssl_stream.receive_some() == b""
        except trio.BrokenResourceError:  # closed without close_notify
            pass


async def test_worker_directory_passes_tls_to_its_clients(nursery, certs):
    addr = await tls_server(nursery, certs)

    async def fetch():
        return {"epoch": 1, "workers": [{"id": "w1", "address": f"{addr[0]}:{addr[1]}"}]}

    async with WorkerDirectory(fetch, secret=SECRET, tls=certs.config("mount")) as workers:
        await workers.update()
        client = await workers.client("w1")
        assert await client.call("echo", x="via tls") == "via tls"


def test_config_errors_are_one_line(certs, tmp_path):
    cert, key = certs.node("a")
    other_cert, other_key = certs.node("b")
    missing = str(tmp_path / "missing.pem")
    cases = {
        (cert, other_key, None): f"TLS key {other_key} does not match certificate {cert}",
        (missing, key, None): f"cannot read TLS certificate {missing}: No such file",
        (cert, key, missing): f"cannot read TLS CA {missing}: No such file",
        (certs.ca_file, None, None): "holds no PEM certificate and private key",
        (cert, key, key): f"TLS CA {key} unusable",
        (None, key, None): "--tls-key needs --tls-cert",
    }
    for args, expected in cases.items():
        with pytest.raises(errors.InvalidArgument) as info:
            TlsConfig.from_files(*args)
        assert expected in info.value.message and "\n" not in info.value.message
    # An encrypted key is refused at once, not prompted for (that would hang a daemon).
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(Path(key).read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(errors.InvalidArgument, match="is encrypted; give it unencrypted"):
        TlsConfig.from_files(cert, encrypted, None)
    assert TlsConfig.from_files() is None
    with pytest.raises(errors.InvalidArgument, match="needs a certificate"):
        RpcServer(Echo(), tls=TlsConfig.from_files(ca=certs.ca_file))


def test_contexts_pin_the_cluster_ca_and_skip_host_names(certs):
    # Workers advertise bare addresses; with a cluster CA nothing checks names against them.
    config = certs.config("node")
    client, server = config.client_context(), config.server_context()
    assert client.check_hostname is False and client.verify_mode == ssl.CERT_REQUIRED
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version == server.minimum_version == ssl.TLSVersion.TLSv1_2
    # Without a cluster CA: the system's CAs and the usual host name check.
    cert, key = certs.node("public")
    assert TlsConfig.from_files(cert, key).client_context().check_hostname is True
