"""Optional TLS between cachefs nodes: certificate files in, `ssl` contexts and streams out.

With a cluster CA (`ca`), TLS is mutual and pinned to that CA: servers require a client
certificate signed by it and clients accept only a server certificate signed by it. Host names
are then not checked: workers advertise bare IP addresses that change with every pod, and the
CA is the cluster's own, so "signed by our CA" already means "a node of this cluster" (the
shared secret, checked inside TLS, is cluster-wide too). Such a CA must sign nothing else.
Without `ca`, servers ask for no client certificate and clients verify the server against the
system's CAs with the usual host name check (the certificate must name the host dialled).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio

from cachefs.errors import AuthenticationFailed, CacheFsError, InvalidArgument, ProtocolError

#: The first byte of every TLS connection (a handshake record); a cachefs frame never starts
#: with it (its header length would exceed 350 MiB).
TLS_RECORD_HANDSHAKE = 0x16

_MIN_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for TLS: this node's certificate and key, and the cluster CA."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    #: None: check host names only when no cluster CA pins the peers (see the module doc).
    check_hostname: bool | None = None
    _contexts: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_files(
        cls,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        *,
        check_hostname: bool | None = None,
    ) -> TlsConfig | None:
        """A config from file paths (None if none is given); problems raise InvalidArgument.

        The files are read at once, so a bad path or a key that does not match its
        certificate is reported when the process starts, not at its first connection.
        A `key` of None means the key is in the `cert` file.
        """
        if cert is None and key is None and ca is None:
            return None
        if key is not None and cert is None:
            raise InvalidArgument("--tls-key needs --tls-cert")
        config = cls(
            str(cert) if cert is not None else None,
            str(key) if key is not None else None,
            str(ca) if ca is not None else None,
            check_hostname,
        )
        config.client_context()
        if cert is not None:
            config.server_context()
        return config

    def server_context(self) -> ssl.SSLContext:
        if "server" not in self._contexts:
            if self.cert is None:
                raise InvalidArgument("a TLS server needs a certificate (--tls-cert, --tls-key)")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = _MIN_VERSION
            self._load_chain(ctx)
            if self.ca is not None:
                self._load_ca(ctx)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._contexts["server"] = ctx
        return self._contexts["server"]

    def client_context(self) -> ssl.SSLContext:
        if "client" not in self._contexts:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server by default
            ctx.minimum_version = _MIN_VERSION
            if self.ca is not None:
                self._load_ca(ctx)
            else:
                ctx.load_default_certs()
            check = self.check_hostname
            ctx.check_hostname = self.ca is None if check is None else check
            if self.cert is not None:
                self._load_chain(ctx)  # presented when the server asks (mutual TLS)
            self._contexts["client"] = ctx
        return self._contexts["client"]

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        def no_passphrase():  # without it OpenSSL would prompt on the terminal and hang a daemon
            key = self.key or self.cert
            raise InvalidArgument(f"TLS key {key} is encrypted; give it unencrypted")

        try:
            ctx.load_cert_chain(self.cert, self.key, password=no_passphrase)
        except ssl.SSLError as e:  # before OSError: SSLError is one
            if e.reason == "KEY_VALUES_MISMATCH":
                raise InvalidArgument(
                    f"TLS key {self.key or self.cert} does not match certificate {self.cert}"
                ) from None
            if self.key is None:
                problem = "holds no PEM certificate and private key (give --tls-key?)"
            else:
                problem = f"or key {self.key} is not in PEM format"
            raise InvalidArgument(f"TLS certificate {self.cert} {problem}") from None
        except OSError as e:
            path = e.filename or next(
                (p for p in (self.cert, self.key) if p and not Path(p).is_file()), self.cert
            )
            raise InvalidArgument(
                f"cannot read TLS certificate {path}: {e.strerror or e}"
            ) from None

    def _load_ca(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except ssl.SSLError as e:
            raise InvalidArgument(
                f"TLS CA {self.ca} unusable ({describe_ssl_error(e)}); a PEM certificate expected"
            ) from None
        except OSError as e:
            raise InvalidArgument(f"cannot read TLS CA {self.ca}: {e.strerror or e}") from None

    def wrap_server(self, stream: trio.abc.Stream) -> trio.SSLStream:
        return trio.SSLStream(stream, self.server_context(), server_side=True)

    def wrap_client(self, stream: trio.abc.Stream, host: str) -> trio.SSLStream:
        return trio.SSLStream(stream, self.client_context(), server_hostname=host)


def ssl_error_in(exc: BaseException | None) -> ssl.SSLError | None:
    """The ssl.SSLError behind `exc` (trio wraps it in BrokenResourceError), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def describe_ssl_error(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if e.reason:
        return e.reason.lower().replace("_", " ")
    return str(e.args[1] if len(e.args) > 1 else e)


def handshake_error(e: ssl.SSLError, peer: str, config: TlsConfig) -> CacheFsError:
    """A one-line error for a TLS failure talking to `peer` ("master at 10.0.0.1:19470")."""
    reason = e.reason or ""
    msg = f"TLS handshake with {peer} failed: {describe_ssl_error(e)}"
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return ProtocolError(f"{msg} (does that server use TLS?)")
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return AuthenticationFailed(msg)
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError) or "EOF" in reason:
        # A server that rejects our certificate hangs up without saying so (trio sends no
        # alert), so the hang-up is the only sign.
        if config.cert is None:
            hint = "it may require a client certificate (--tls-cert, --tls-key)"
        else:
            hint = (
                f"was our certificate {config.cert} rejected? it must be signed by the "
                "server's --tls-ca and allow clientAuth (the server's log says why)"
            )
        return AuthenticationFailed(f"TLS handshake with {peer} failed: server hung up; {hint}")
    return ProtocolError(msg)
