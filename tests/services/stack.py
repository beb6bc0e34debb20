"""A disaggregated stack without Ray, for tests: prefill and decode servers on real
engines, a real KV store shard process, the router pipeline and its HTTP front end."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.outputs import RequestOutput
from services.decode.server import DecodeServer
from services.kv_bridge import KVBridge
from services.kvstore.client import ClientConfig, KVStoreClient
from services.pool_requests import DecodeRequest, PoolStats
from services.prefill.server import PrefillServer
from services.router.disaggregated import DisaggregatedPipeline
from services.router.pool_clients import LocalDecodePool, LocalPrefillPool, StorePrefixIndex
from tests.ports import free_port

MODEL = "smollm2-135m-instruct"


class Shard:
    def __init__(self) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        host, port = self.address.split(":")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.kvstore.main",
                "--host",
                host,
                "--port",
                port,
                "--capacity",
                "128MiB",
                "--shard-id",
                "test-0",
                "--no-shared-memory",
            ],
        )
        deadline = time.monotonic() + 60
        while not self._up():
            assert self.proc.poll() is None and time.monotonic() < deadline, "shard down"
            time.sleep(0.2)

    def _up(self) -> bool:
        host, port = self.address.split(":")
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Stack:
    """Pools, pipeline and HTTP front end, on one background event loop thread."""

    def __init__(self, checkpoint: LoadedCheckpoint, shard: Shard, **engine_args: object) -> None:
        def engine(linear: str) -> AsyncEngine:
            kwargs: dict = {"max_model_len": 512, "kv_cache_bytes": 32 * 2**20, **engine_args}
            return AsyncEngine(EngineArgs(linear=linear, **kwargs).create_engine(checkpoint))

        self.prefill_engine, self.decode_engine = engine("fp8"), engine("int4")
        self.prefill = PrefillServer(
            self.prefill_engine, KVBridge(self.prefill_engine, [shard.address], 5, 30), MODEL
        )
        self.decode = DecodeServer(
            self.decode_engine, KVBridge(self.decode_engine, [shard.address], 5, 30), MODEL
        )
        card = self.decode.describe()
        index = KVStoreClient(
            [shard.address], card.fingerprint, card.block_format, ClientConfig(timeout_s=5)
        )
        self.pipeline = DisaggregatedPipeline(
            self.prefill.describe(),
            card,
            LocalPrefillPool(self.prefill),
            LocalDecodePool(self.decode),
            StorePrefixIndex(index),
            local_prefill_threshold=16,
            prefill_timeout_s=60,
            transfer_timeout_s=5,
            max_inflight=8,
        )
        self.shard = shard

    def idle(self) -> bool:
        def check(e: LLMEngine) -> bool:
            return (
                not e.has_unfinished
                and e.pool.num_free_blocks == e.pool.num_blocks
                and e.port.num_held == 0
            )

        return all(e.call(check) for e in (self.prefill_engine, self.decode_engine))

    def store_leases(self) -> float:
        return asyncio.run(self.read_store_leases())

    async def read_store_leases(self) -> float:
        """Leases the shard holds, asked by a client of its own (on the running loop)."""
        card = self.decode.describe()
        client = KVStoreClient([self.shard.address], card.fingerprint, card.block_format)
        try:
            stats = await client.stats()
            return sum(s.get("baton_kv_store_leases", 0.0) for s in stats.values())
        finally:
            await client.close()

    def shutdown(self) -> None:
        self.prefill_engine.shutdown()
        self.decode_engine.shutdown()


class QueuedDecodePool:
    """The stack's decode pool behind a queue: the replica starts `delay_s` after the router
    sends it the request (Ray routing a request to a busy replica)."""

    def __init__(self, inner: LocalDecodePool, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        await asyncio.sleep(self.delay_s)
        async for out in self.inner.generate(request):
            yield out

    async def stats(self) -> list[PoolStats]:
        return await self.inner.stats()
