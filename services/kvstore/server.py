"""KVStoreServer: runs one shard — the gRPC service, health, reflection and index upkeep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.baton.v1 import kvstore_pb2 as pb
from services.grpc_tracing import server_interceptors
from services.kvstore.codec import MAX_MESSAGE_BYTES, MESSAGE_BYTES
from services.kvstore.errors import KVStoreError
from services.kvstore.index import PrefixIndex, ShardInfo, open_index, redact_url
from services.kvstore.index_sync import IndexSync
from services.kvstore.security import ShardSecurity
from services.kvstore.segment import SharedSegment
from services.kvstore.servicer import SERVICE_NAME, STREAM_IDLE_S, KVStoreServicer
from services.kvstore.store import BlockStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 50052

GRPC_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: a second shard on this port would start and the
    # kernel would split connections between two unrelated stores
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # a dead peer's open PutShared/GetShared streams (and their reservations and pins)
    # end when keepalive notices, not at some far-off deadline
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True)
class ServerConfig:
    """One shard. `index_url` None keeps the prefix index in process (single shard); a
    Redis URL may carry the index's user and password (redis://user:pass@host), which
    `index_username`/`index_password` supply when it does not."""

    shard_id: str
    capacity_bytes: int
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    index_url: str | None = None
    advertise_address: str | None = None
    shared_memory_dir: Path | None = Path("/dev/shm")
    heartbeat_interval_s: float = 1.0
    reconcile_interval_s: float = 60.0
    index_timeout_s: float = 1.0
    message_bytes: int = MESSAGE_BYTES
    """Size of the bulk messages gets are packed into (at most MAX_MESSAGE_BYTES)."""
    stream_idle_s: float = STREAM_IDLE_S
    """A put or shared-memory get silent this long, or a get whose client reads nothing this
    long, is abandoned, freeing what it holds."""
    security: ShardSecurity = field(default_factory=ShardSecurity)
    """The token clients must send and the port's TLS; the default admits anyone."""
    index_username: str | None = None
    index_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.shard_id or len(self.shard_id) > 128 or any(c in self.shard_id for c in ": "):
            raise ValueError(
                f"shard_id must be 1 to 128 characters without ':' or spaces, got {self.shard_id!r}"
            )
        if self.capacity_bytes <= 0:
            raise ValueError(f"capacity must be > 0 bytes, got {self.capacity_bytes}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.heartbeat_interval_s <= 0 or self.reconcile_interval_s <= 0:
            raise ValueError("heartbeat_interval_s and reconcile_interval_s must be > 0")
        if not 4096 <= self.message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(
                f"message_bytes must be in [4096, {MAX_MESSAGE_BYTES}], got {self.message_bytes}"
            )


class KVStoreServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        security = config.security
        credentials = security.credentials()  # first: unreadable files leave nothing behind
        self._index: PrefixIndex = open_index(
            config.index_url, config.index_username, config.index_password
        )
        self._server = grpc.aio.server(
            options=GRPC_OPTIONS, interceptors=[*security.interceptors(), *server_interceptors()]
        )
        self._health = health.aio.HealthServicer()
        self._upkeep: asyncio.Task[None] | None = None
        self._stopped = False
        address = f"{config.host}:{config.port}"
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port} (in use?)")
        self._segment = SharedSegment.create(config.capacity_bytes, config.shared_memory_dir)
        self.store = BlockStore(self._segment)
        self.address = config.advertise_address or f"{self._advertised_host()}:{self.port}"
        self.sync = IndexSync(
            self._index,
            ShardInfo(config.shard_id, self.address),
            lambda: list(self.store.arena),
            self.store.metrics,
            heartbeat_ttl_s=3 * config.heartbeat_interval_s,
            reconcile_interval_s=config.reconcile_interval_s,
            timeout_s=config.index_timeout_s,
        )
        self._server.add_generic_rpc_handlers(
            (
                KVStoreServicer(
                    self.store, self.sync, config.message_bytes, config.stream_idle_s
                ).rpc_handler(),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        assert pb.DESCRIPTOR.services_by_name["KVStore"].full_name == SERVICE_NAME

    async def start(self) -> None:
        """Serves, announces the shard to the index, and keeps that announcement true.

        Raises IndexRefusedError, having released everything, when the index refuses this
        shard's credentials; an index that cannot be reached yet is healed later.
        """
        await self._server.start()
        try:
            await self.sync.announce()
        except KVStoreError:
            await self.stop(None)
            raise
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._upkeep = asyncio.create_task(self._run_upkeep())
        log.info(
            "kvstore shard %s serving on %s (%d bytes, index %s, shared memory %s, %s)",
            self.config.shard_id,
            self.address,
            self.store.arena.capacity,
            redact_url(self.config.index_url) if self.config.index_url else "in-process",
            self._segment.path or "off",
            self.config.security.summary,
        )

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stops serving and removes the segment; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        await self._server.stop(grace_s)
        await self._index.close()
        self._segment.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def _run_upkeep(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            self.store.expire_leases()
            await self.sync.tick()

    def _advertised_host(self) -> str:
        if self.config.host in ("0.0.0.0", "::", "[::]", ""):
            return socket.gethostname()
        return self.config.host
