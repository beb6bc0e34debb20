"""The router's front ends over a real engine: one fp32 SmolLM2 engine for the session,
served by real uvicorn (HTTP) and real grpc.aio servers on 127.0.0.1, each on its own
thread and event loop. Every test ends with the engine idle: no request left running,
every KV block free."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import openai
import pytest
import uvicorn
from fastapi import FastAPI
from ray.exceptions import RayTaskError

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.outputs import RequestOutput
from services.router.errors import OverloadedError
from services.router.grpc_api import build_grpc_server
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline, GenerationRequest, Pipeline
from tests.ports import free_port

MODEL_ID = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def engine(default_checkpoint: LoadedCheckpoint) -> Iterator[AsyncEngine]:
    args = EngineArgs(dtype="float32", max_model_len=1024, kv_cache_bytes=64 * 2**20)
    engine = AsyncEngine(args.create_engine(default_checkpoint))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def pipeline(engine: AsyncEngine) -> ColocatedPipeline:
    return ColocatedPipeline(engine, MODEL_ID)


def engine_is_idle(engine: AsyncEngine) -> bool:
    def idle(e: LLMEngine) -> bool:
        return not e.has_unfinished and e.pool.num_free_blocks == e.pool.num_blocks

    return engine.num_unfinished == 0 and engine.call(idle)


def wait_until_idle(engine: AsyncEngine, timeout_s: float = 30.0) -> None:
    """Cancellation reaches the engine asynchronously (a disconnect, then a task cancel)."""
    deadline = time.monotonic() + timeout_s
    while not engine_is_idle(engine):
        assert time.monotonic() < deadline, "the engine still holds requests or blocks"
        time.sleep(0.02)


def generated_tokens(engine: AsyncEngine) -> int:
    return engine.call(lambda e: e.stats.generated_tokens)


def hang_up_once_generating(base_url: str, engine: AsyncEngine, path: str, body: bytes) -> int:
    """POSTs `body` to `path` on a raw socket, closes it as soon as the engine generates,
    and waits for the engine to go idle; returns the tokens generated meanwhile."""
    before = generated_tokens(engine)
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while generated_tokens(engine) == before:  # wait until it is really generating
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    wait_until_idle(engine)
    return generated_tokens(engine) - before


@pytest.fixture(autouse=True)
def _engine_left_idle(engine: AsyncEngine) -> Iterator[None]:
    yield
    wait_until_idle(engine)


@contextlib.contextmanager
def serve_http(app: FastAPI) -> Iterator[str]:
    """Serves `app` with uvicorn on a free port of 127.0.0.1; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_grpc(get_pipeline: Callable[[], Pipeline], **options: Any) -> Iterator[str]:
    """Runs build_grpc_server's server (with `options`: api_keys, max_request_bytes) on its
    own thread and loop; yields its address."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def run() -> None:
        server, _ = build_grpc_server(get_pipeline, port, host="127.0.0.1", **options)
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(grace=None)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(timeout=10), "the gRPC server did not start"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="session")
def base_url(pipeline: ColocatedPipeline) -> Iterator[str]:
    with serve_http(build_http_app(lambda: pipeline)) as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def grpc_address(pipeline: ColocatedPipeline) -> Iterator[str]:
    with serve_grpc(lambda: pipeline) as address:
        yield address


class SwitchedPipeline(Pipeline):
    """The real pipeline behind switches a test flips: not ready, queues full, failing
    after some outputs (as when a decode replica dies mid-stream), or refusing the request
    from behind a Ray call (the pool's ValueError inside Ray's RayTaskError)."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.tokenizer = inner.tokenizer
        self.max_model_len = inner.max_model_len
        self.vocab_size = inner.vocab_size
        self.is_ready = True
        self.full = False
        self.fail_after: int | None = None
        self.refusal: str | None = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self.full:
            raise OverloadedError("every decode replica's queue is full", retry_after_s=2.5)
        if self.refusal is not None:
            remote = "Traceback (most recent call last):\n  File ...\nValueError: " + self.refusal
            raise RayTaskError("generate", remote, ValueError(self.refusal)).as_instanceof_cause()
        outputs = cast(AsyncGenerator[RequestOutput, None], self.inner.generate(request))
        async with contextlib.aclosing(outputs):
            sent = 0
            async for out in outputs:
                if sent == self.fail_after:
                    raise RuntimeError("decode replica lost")
                sent += 1
                yield out

    def ready(self) -> bool:
        return self.is_ready
