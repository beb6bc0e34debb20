"""Fixtures for the kvstore suite: a real redis-server on a free port, real shards on
127.0.0.1, and a small block format so tests move kilobytes, not gigabytes."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import torch

from engine.hashing import KVFingerprint, block_hashes
from engine.kv_format import KVBlockFormat
from services.kvstore.client import ClientConfig, KVStoreClient
from services.kvstore.server import KVStoreServer, ServerConfig
from tests.ports import free_port

FORMAT = KVBlockFormat(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="bf16")
FINGERPRINT = KVFingerprint("test/tiny", "digest-1", "bf16", 1, "fp8", 16)
BLOCK = FORMAT.nbytes  # 4096 bytes


def make_blocks(count: int, seed: int = 0) -> torch.Tensor:
    """`count` distinct blocks, block-major like the engine's paged cache."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *FORMAT.shape, generator=generator).to(FORMAT.torch_dtype)


def make_hashes(count: int, seed: int = 0) -> list[bytes]:
    tokens = [(seed * 7919 + i) % 50_000 for i in range(count * FORMAT.block_size)]
    return block_hashes(FINGERPRINT, tokens)


class RedisProcess:
    """A redis-server of the test's own, which the test may kill and start again."""

    def __init__(self, workdir: Path, *args: str) -> None:
        """`args`: more redis-server flags, such as `--requirepass`."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run `make redis`")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up, maybe locked
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    redis = RedisProcess(tmp_path)
    yield redis
    if redis.process is not None:
        redis.kill()


ShardFactory = Callable[..., AbstractAsyncContextManager[KVStoreServer]]


@pytest.fixture
def shard() -> ShardFactory:
    """`async with shard(capacity_blocks=..., **ServerConfig fields) as server:`."""

    @asynccontextmanager
    async def start(capacity_blocks: int = 64, **overrides: object) -> AsyncIterator[KVStoreServer]:
        settings: dict[str, object] = {
            "shard_id": "s0",
            "capacity_bytes": capacity_blocks * BLOCK,
            "host": "127.0.0.1",
            "port": 0,
            "heartbeat_interval_s": 0.2,
        }
        settings.update(overrides)
        server = KVStoreServer(ServerConfig(**settings))  # type: ignore[arg-type]
        await server.start()
        try:
            yield server
        finally:
            await server.stop(grace_s=None)

    return start


def client_for(server: KVStoreServer, **config: object) -> KVStoreClient:
    return KVStoreClient(
        [f"127.0.0.1:{server.port}"],
        FINGERPRINT,
        FORMAT,
        ClientConfig(**config),  # type: ignore[arg-type]
    )


async def eventually(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Polls until `predicate()` is truthy (for state that background upkeep changes)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
