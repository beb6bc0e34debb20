"""The front door over the disaggregated path (FP8 prefill and INT4 decode engines, a real
KV store shard process, real HTTP and gRPC): tenants, overload, and clients that hang up.

Each test hangs up at one point of a request's life (while prefill computes the prompt,
while decode pulls the handoff's blocks, mid-stream) and then waits until the store
holds no lease and both engines are idle: no request running or waiting, every block
back in the free queue (cached blocks stay cached, unreferenced), nothing pinned. Where a
point is too short to hit by chance, a gate holds the request there until the client
has gone. Overload is checked the same way: a request held at the gate fills the router.

HTTP and gRPC are served from one event loop, as in a router replica: the pools' KV store
clients belong to the loop that first uses them. Every request carries an API key.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx2
import pytest
import uvicorn

from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
from services.router.api_keys import ApiKeys
from services.router.grpc_api import build_grpc_server
from services.router.http_api import build_http_app
from tests.services.stack import Stack

from .conftest import free_port

LONG = 200  # tokens a request would generate if nobody stopped it
PROMPT = (
    "A field guide to the tide pools of the rocky shore: anemones close when the water "
    "leaves them, hermit crabs trade shells at low tide, and sea stars pry mussels open "
    "with a patience measured in hours. Write the next chapter, about the kelp forest."
)


KEYS = ApiKeys(["sk-a", "sk-b"])
AUTH = "Bearer sk-a"


@dataclass
class Front:
    url: str
    grpc_address: str


@pytest.fixture(scope="module")
def front(stack: Stack) -> Iterator[Front]:
    """uvicorn and the gRPC server on one loop of their own thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    grpc_port = free_port()
    app = build_http_app(lambda: stack.pipeline, api_keys=KEYS)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    http = uvicorn.Server(config)

    async def run() -> None:
        grpc_server, _ = build_grpc_server(lambda: stack.pipeline, grpc_port, api_keys=KEYS)
        await grpc_server.start()
        serving = asyncio.create_task(http.serve())
        while not http.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        started.set()
        await stop.wait()
        http.should_exit = True
        await serving
        await grpc_server.stop(grace=None)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(timeout=30), "the front ends did not start"
    port = http.servers[0].sockets[0].getsockname()[1]
    try:
        yield Front(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="module")
def url(front: Front) -> str:
    return front.url


@pytest.fixture
def channel(front: Front) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(front.grpc_address) as channel:
        yield channel


@pytest.fixture(autouse=True)
def _nothing_left_behind(stack: Stack) -> Iterator[None]:
    yield
    wait_for(lambda: stack.pipeline.inflight == 0, "the router still counts a request")
    wait_for(stack.idle, "a pool still runs a request or holds blocks")
    wait_for(lambda: stack.store_leases() == 0, "the store still holds a lease")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def generated(stack: Stack) -> int:
    return stack.decode_engine.call(lambda e: e.stats.generated_tokens)


@contextmanager
def raw_stream(url: str, **fields: Any) -> Iterator[socket.socket]:
    """A streaming completion sent on a bare socket, so the test hangs up exactly when it
    chooses (even before the status line); leaving the block closes the connection."""
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True, **fields}
    payload = json.dumps(body).encode()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: {AUTH}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        yield conn


class Gate:
    """Holds every call of an async method at its start until opened; `reached` is set
    when the first call arrives."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    async def wait(self) -> None:
        self.reached.set()
        while not self.opened.is_set():  # a cancelled client cancels this sleep
            await asyncio.sleep(0.01)


@contextmanager
def gated(bridge: Any, method: str) -> Iterator[Gate]:
    """Every call of `bridge.method` held at its start while the block runs."""
    real = getattr(bridge, method)
    gate = Gate()

    async def held(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real(*args, **kwargs)

    setattr(bridge, method, held)
    try:
        yield gate
    finally:
        gate.opened.set()
        delattr(bridge, method)


def hang_up_at(gate: Gate, stack: Stack, url: str, salt: str) -> float:
    """Streams a request, hangs up once it is held at `gate`, and waits until the router
    has let go of it while the gate is still shut."""
    with raw_stream(url, cache_salt=salt):
        assert gate.reached.wait(60), "the request never reached the gate"
        held = stack.store_leases()
    wait_for(lambda: stack.pipeline.inflight == 0, "the router still counts the request")
    return held


def test_hanging_up_once_prefill_has_computed_the_prompt(stack: Stack, url: str) -> None:
    """Before the first token: prefill holds the prompt's blocks, about to publish them."""
    computed = stack.prefill_engine.call(lambda e: e.stats.computed_tokens)
    with gated(stack.prefill.bridge, "export") as gate:
        assert hang_up_at(gate, stack, url, "before-first-token") == 0
    assert stack.prefill_engine.call(lambda e: e.stats.computed_tokens) > computed
    assert stack.decode_engine.num_unfinished == 0


def test_hanging_up_while_decode_pulls_the_handoff(stack: Stack, url: str) -> None:
    with gated(stack.decode.bridge, "fetch") as gate:
        assert hang_up_at(gate, stack, url, "during-handoff") == 1  # the handoff's lease
    assert stack.decode_engine.num_unfinished == 0  # it never reached the decode engine


def test_hanging_up_mid_stream(stack: Stack, url: str) -> None:
    before = generated(stack)
    with raw_stream(url, cache_salt="mid-stream") as conn:
        received = b""
        while received.count(b"data: ") < 3:
            chunk = conn.recv(65536)
            assert chunk, "the server closed the stream"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    wait_for(stack.idle, "a pool still runs a request or holds blocks")
    assert generated(stack) - before < LONG


def test_cancelling_a_grpc_stream_mid_way(stack: Stack, channel: grpc.Channel) -> None:
    before = generated(stack)
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=LONG, ignore_eos=True, temperature=0)
    call = pb_grpc.InferenceStub(channel).Generate(
        request, metadata=(("authorization", AUTH),), timeout=120
    )
    assert next(call).finish_reason == ""
    call.cancel()
    wait_for(stack.idle, "a pool still runs a request or holds blocks")
    assert generated(stack) - before < LONG


def test_a_full_router_says_when_to_retry_on_both_protocols(
    stack: Stack, url: str, channel: grpc.Channel
) -> None:
    limit = stack.pipeline.max_inflight
    stack.pipeline.max_inflight = 1
    try:
        with (
            gated(stack.decode.bridge, "fetch") as gate,
            raw_stream(url, cache_salt="overload", max_tokens=2),
        ):
            assert gate.reached.wait(60), "the first request never reached decode"
            with pytest.raises(grpc.RpcError) as full:
                list(
                    pb_grpc.InferenceStub(channel).Generate(
                        pb.GenerateRequest(prompt="Hi"), metadata=(("authorization", AUTH),)
                    )
                )
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert full.value.details() == (
                "the server is at its limit of 1 choices in flight (each prompt x n choice of "
                "a request counts one)"
            )
            assert dict(full.value.trailing_metadata() or ())["retry-after"] == "1"
            parts = urlsplit(url)
            with socket.create_connection((parts.hostname, parts.port)) as conn:
                body = b'{"prompt": "Hi", "max_tokens": 1}'
                conn.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                    + f"Content-Type: application/json\r\nAuthorization: {AUTH}\r\n".encode()
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429") and b"\r\nretry-after: 1\r\n" in head
            assert json.loads(payload)["error"]["code"] == "overloaded"
    finally:
        stack.pipeline.max_inflight = limit


def test_tenants_do_not_share_the_stores_prefixes(stack: Stack, url: str) -> None:
    """Tenant B's prompt is computed in full by prefill although tenant A's copy of it is
    in the KV store, and B is told nothing was cached. (Threshold 0: every prompt goes
    through remote prefill, which reads the stored prefix.)"""
    prompt = "Tenant isolation check, verbatim: " + PROMPT
    prompt_tokens = len(stack.pipeline.tokenizer.encode(prompt))
    assert prompt_tokens % 16  # a partial last block: always something left to compute

    def prefill_computed() -> int:
        return stack.prefill_engine.call(lambda e: e.stats.computed_tokens)

    threshold, stack.pipeline.threshold = stack.pipeline.threshold, 0
    with httpx2.Client(base_url=url, timeout=120) as http:

        def cached_tokens(key: str) -> int:
            body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
            r = http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        try:
            before = prefill_computed()
            assert cached_tokens("sk-a") == 0
            assert prefill_computed() - before == prompt_tokens
            before = prefill_computed()
            hit = cached_tokens("sk-a")
            assert hit > 0 and prefill_computed() - before == prompt_tokens - hit
            before = prefill_computed()
            assert cached_tokens("sk-b") == 0
            assert prefill_computed() - before == prompt_tokens
        finally:
            stack.pipeline.threshold = threshold


def test_hanging_up_while_prefill_publishes_frees_its_lease_at_once(stack: Stack, url: str) -> None:
    """The prompt's stored prefix is already leased when the client goes, while the rest
    of its blocks are on their way to the store: the lease is released then and there,
    not left to its TTL."""
    body = {"prompt": PROMPT, "max_tokens": 1, "cache_salt": "publish"}
    first = httpx2.post(f"{url}/v1/completions", json=body, headers={"Authorization": AUTH})
    assert first.status_code == 200, first.text
    assert stack.prefill.bridge is not None
    client = stack.prefill.bridge.client(stack.prefill_engine.engine.fingerprint)
    with gated(client, "put") as gate:
        # More new tokens than the router's local-prefill threshold: prefill takes it.
        more = " Then the octopus, who had watched it all from a crevice, told its own story."
        with raw_stream(url, cache_salt="publish", prompt=PROMPT + more * 2):
            assert gate.reached.wait(60), "prefill never published"
            wait_for(lambda: stack.store_leases() > 0, "the stored prefix was never leased")
        wait_for(lambda: stack.pipeline.inflight == 0, "the router still counts the request")
        # Well inside the 30 s TTL the stack's leases have: released, not expired.
        wait_for(lambda: stack.store_leases() == 0, "the lease outlived its request", 5)
