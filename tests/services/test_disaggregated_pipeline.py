"""The router's request path without Ray: real FP8 prefill and INT4 decode engines, a real
KV store shard process, real HTTP. Faults are real too: a killed shard, a prefill that
misses its deadline, a full router."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from services.decode.server import DecodeServer
from services.kv_bridge import KVBridge
from services.kvstore.client import ClientConfig, KVStoreClient
from services.prefill.server import PrefillServer
from services.router.disaggregated import DisaggregatedPipeline
from services.router.http_api import build_http_app
from services.router.pool_clients import LocalDecodePool, LocalPrefillPool, StorePrefixIndex
from tests.services.router.conftest import free_port, serve_http

MODEL = "smollm2-135m-instruct"
LONG = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely. Question: when do you open?"
)


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
        import socket

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

    def __init__(self, checkpoint: LoadedCheckpoint, shard: Shard) -> None:
        def engine(linear: str) -> AsyncEngine:
            args = EngineArgs(linear=linear, max_model_len=512, kv_cache_bytes=32 * 2**20)
            return AsyncEngine(args.create_engine(checkpoint))

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
        def check(e: object) -> bool:
            eng = e  # type: ignore[assignment]
            return (
                not eng.has_unfinished  # type: ignore[attr-defined]
                and eng.pool.num_free_blocks == eng.pool.num_blocks  # type: ignore[attr-defined]
                and eng.port.num_held == 0  # type: ignore[attr-defined]
            )

        return all(e.call(check) for e in (self.prefill_engine, self.decode_engine))

    def store_leases(self) -> float:
        card = self.decode.describe()
        client = KVStoreClient([self.shard.address], card.fingerprint, card.block_format)

        async def read() -> float:
            try:
                stats = await client.stats()
                return sum(s.get("baton_kv_store_leases", 0.0) for s in stats.values())
            finally:
                await client.close()

        return asyncio.run(read())


@pytest.fixture(scope="module")
def shard() -> Iterator[Shard]:
    s = Shard()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack(default_checkpoint: LoadedCheckpoint, shard: Shard) -> Iterator[Stack]:
    stack = Stack(default_checkpoint, shard)
    yield stack
    stack.prefill_engine.shutdown()
    stack.decode_engine.shutdown()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with (
        serve_http(build_http_app(lambda: stack.pipeline)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


def complete(http: httpx.Client, prompt: str, **kw: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    return http.post("/v1/completions", json=body)


def wait_idle(stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while not stack.idle():
        assert time.monotonic() < deadline, "a pool still holds requests or blocks"
        time.sleep(0.05)


def test_long_prompts_travel_through_the_store_short_ones_stay_local(
    stack: Stack, http: httpx.Client
) -> None:
    r = complete(http, LONG)
    assert r.status_code == 200, r.text
    assert stack.prefill.bridge and stack.prefill.bridge.bytes["put"] > 0
    assert stack.decode.bridge and stack.decode.bridge.bytes["get"] > 0
    assert not stack.decode.fallbacks
    short = complete(http, "Hi")
    assert short.status_code == 200
    assert stack.pipeline.local_prefills["short_prompt"] == 1
    wait_idle(stack)
    assert stack.store_leases() == 0  # decode released the handoff's lease


def test_errors_are_openai_shaped_and_leave_nothing_behind(
    stack: Stack, http: httpx.Client
) -> None:
    r = complete(http, "word " * 600)
    assert r.status_code == 400 and "context window is 512 tokens" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http.post(
        "/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    wait_idle(stack)
    assert stack.store_leases() == 0


def test_full_router_answers_429_with_retry_after(stack: Stack, http: httpx.Client) -> None:
    limit = stack.pipeline.max_inflight
    stack.pipeline.max_inflight = 1
    try:
        results: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: results.append(complete(http, LONG, max_tokens=64, ignore_eos=True))
        )
        slow.start()
        deadline = time.monotonic() + 30
        while stack.pipeline.inflight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = complete(http, "Hello")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        slow.join()
        assert results[0].status_code == 200
    finally:
        stack.pipeline.max_inflight = limit
    wait_idle(stack)


def test_late_prefill_falls_back_to_local_prefill(stack: Stack, http: httpx.Client) -> None:
    timeout = stack.pipeline.prefill_timeout_s
    stack.pipeline.prefill_timeout_s = 1e-4
    try:
        r = complete(http, "On Sundays: " + LONG)  # nothing cached: a remote prefill
    finally:
        stack.pipeline.prefill_timeout_s = timeout
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert stack.pipeline.local_prefills["prefill_timeout"] == 1
    wait_idle(stack)


def test_a_dead_shard_costs_cache_hits_not_requests(stack: Stack, http: httpx.Client) -> None:
    stack.shard.stop()
    r = complete(http, "On holidays: " + LONG)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert stack.prefill.fallbacks["kv_export"] == 1
    wait_idle(stack)
