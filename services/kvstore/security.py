"""Who may talk to a shard: a shared bearer token, and TLS (optionally mutual) on the wire.

    server = KVStoreServer(ServerConfig(..., security=ShardSecurity(token=token)))
    client = KVStoreClient(targets, ..., ClientConfig(security=ClientSecurity(token=token)))

With a token, every call of `baton.v1.KVStore` must carry `authorization: Bearer <token>`
metadata, or it ends UNAUTHENTICATED before its handler runs or its request is parsed.
That covers the shared-memory fast path too: a client learns the segment's path and
secret only from `OpenSharedMemory`, itself a gated call. `grpc.health.v1.Health` and
server reflection stay open: Kubernetes' gRPC probes cannot send metadata, and reflection
only describes the public proto/ files. The token travels in the clear unless TLS is on;
inside a cluster that is the NetworkPolicy's job, across untrusted networks turn on TLS.

Clients add the metadata to each call themselves (`ClientSecurity.metadata`) rather than
through an interceptor: grpc.aio interceptors wrap every call and stream in an extra task,
a cost the bulk transfer path should not pay for one constant header.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from proto.baton.v1 import kvstore_pb2 as pb

TOKEN_ENV = "BATON_KVSTORE_TOKEN"
"""The environment variable `baton kvstore` and the pools read the shared token from."""
MAX_TOKEN_CHARS = 4096

Metadata = tuple[tuple[str, str], ...]


def check_token(token: str, source: str = "kvstore token") -> str:
    """`token` if it can travel as gRPC metadata, else a ValueError naming `source`."""
    if not 1 <= len(token) <= MAX_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{source} must be 1 to {MAX_TOKEN_CHARS} printable ASCII characters without "
            f"spaces (got {len(token)} characters)"
        )
    return token


def read_token_file(path: str | Path) -> str:
    """The token in a file (such as a mounted Secret), without its trailing newline."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the kvstore token file {path}: {exc}") from None
    return check_token(text, f"the kvstore token in {path}")


def token_from_env() -> str | None:
    """BATON_KVSTORE_TOKEN, or None when unset or empty."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    return check_token(value, TOKEN_ENV) if value else None


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc}") from None
    if b"-----BEGIN " not in data:  # gRPC would only fail at the first handshake
        raise ValueError(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class ShardSecurity:
    """A shard's side: the token it requires, and its TLS identity (None: plaintext)."""

    token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    """PEM certificate chain the shard presents; with `tls_key`."""
    tls_key: Path | None = None
    client_ca: Path | None = None
    """PEM CA bundle client certificates must chain to (mutual TLS); needs `tls_cert`."""

    def __post_init__(self) -> None:
        if self.token is not None:
            check_token(self.token)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a shard's TLS needs both a certificate and its key (--tls-key)")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("a client CA (mutual TLS) needs the shard's own TLS cert and key")

    @property
    def summary(self) -> str:
        """What a client must bring, for the shard's start-up log line."""
        needs = [
            what
            for what, on in (
                ("a token", self.token is not None),
                ("TLS", self.tls_cert is not None),
                ("a client certificate", self.client_ca is not None),
            )
            if on
        ]
        return "clients need " + ", ".join(needs) if needs else "no authentication"

    def credentials(self) -> grpc.ServerCredentials | None:
        """The shard port's TLS credentials, or None for a plaintext port."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        pair = (_read_pem(self.tls_key, "TLS key"), _read_pem(self.tls_cert, "TLS certificate"))
        roots = None if self.client_ca is None else _read_pem(self.client_ca, "client CA bundle")
        return grpc.ssl_server_credentials(
            [pair], root_certificates=roots, require_client_auth=roots is not None
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.token is None else [TokenCheck(self.token)]


@dataclass(frozen=True)
class ClientSecurity:
    """A client's side: the token it sends, and whether and how it verifies shards' TLS."""

    token: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    """PEM bundle of the CAs shard certificates chain to (None: the system's roots)."""
    cert_file: Path | None = None
    """PEM certificate this client presents to shards that ask (mutual TLS); with key_file."""
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None:
            check_token(self.token)
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("a CA bundle or client certificate needs tls=True")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @property
    def metadata(self) -> Metadata:
        """What each call carries: the token, if any."""
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)

    def channel(
        self,
        address: str,
        options: Sequence[tuple[str, Any]],
        interceptors: Sequence[grpc.aio.ClientInterceptor],
    ) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=None if self.ca_file is None else _read_pem(self.ca_file, "CA"),
            private_key=None if self.key_file is None else _read_pem(self.key_file, "key"),
            certificate_chain=(
                None if self.cert_file is None else _read_pem(self.cert_file, "certificate")
            ),
        )
        return grpc.aio.secure_channel(
            address, credentials, options=options, interceptors=interceptors
        )


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that ends the call UNAUTHENTICATED without reading
    (or parsing) a byte of the request."""

    async def refuse(_: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Admits a KVStore call only with `authorization: Bearer <token>` (compared in
    constant time); calls of other services (health, reflection) pass untouched."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {check_token(token)}".encode()
        self._prefix = f"/{pb.DESCRIPTOR.services_by_name['KVStore'].full_name}/"

    async def intercept_service(
        self,
        continuation: Any,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: grpc.RpcMethodHandler | None = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        sent = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if not sent:
            return _refusal(
                handler,
                "this kvstore shard requires a token: send `authorization: Bearer <token>` "
                f"metadata (clients read it from {TOKEN_ENV} or the kvstore token settings)",
            )
        if not any(hmac.compare_digest(self._as_bytes(v), self._expected) for v in sent):
            return _refusal(
                handler, "kvstore token rejected: it is not the token this shard was given"
            )
        return handler

    @staticmethod
    def _as_bytes(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
