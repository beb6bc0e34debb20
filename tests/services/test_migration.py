"""A decode replica that dies or stalls mid-stream: the request migrates to another replica
and the client gets every token once, the same tokens as an undisturbed run; a dead
prefill replica costs a local prefill, not the request; a request that cannot finish ends
with an error before its deadline.

Real FP8 prefill and INT4 decode engines (fp32, batch-invariant, so runs compare
exactly), a real KV store shard and real HTTP. A "dead" replica is one whose engine is
shut down mid-stream (its stream fails as a crashed replica's does); a stalled one stops
sending without failing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2 as httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from services.decode.server import DecodeServer
from services.kv_bridge import KVBridge
from services.pool_requests import DecodeRequest, PoolStats
from services.prefill.server import PrefillServer
from services.router.disaggregated import DisaggregatedPipeline
from services.router.http_api import build_http_app
from services.router.pipeline import Pipeline
from services.router.pool_clients import LocalDecodePool, LocalPrefillPool, StorePrefixIndex
from tests.services.router.conftest import serve_http
from tests.services.stack import MODEL, QueuedDecodePool, Shard, Stack

ENGINE = {"max_model_len": 512, "kv_cache_bytes": 32 * 2**20, "dtype": "float32"}
PROMPT = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely. Question: when do you open on Sundays?"
)
TOKENS = 20


class Stalling:
    """A decode replica that takes a request up (its empty first output) and sends
    `after` outputs with tokens, then nothing, without failing."""

    def __init__(self, server: DecodeServer, after: int) -> None:
        self.server = server
        self.after = after
        self.closed = 0  # streams the router closed

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        n = 0
        try:
            async for out in self.server.generate(request):
                if out.new_token_ids or out.finished:
                    if n == self.after:
                        await asyncio.Event().wait()
                    n += 1
                yield out
        finally:
            self.closed += 1

    async def stats(self) -> PoolStats:
        return await self.server.stats()


@pytest.fixture(scope="module")
def stack(default_checkpoint: LoadedCheckpoint, shard: Shard) -> Iterator[Stack]:
    stack = Stack(default_checkpoint, shard, dtype="float32", batch_invariant=True)
    yield stack
    stack.shutdown()


class Front:
    """One HTTP front end whose pipeline each test sets."""

    pipeline: Pipeline

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.calls = 0

    def stream(self, on_chunk: Any = None, **body: Any) -> tuple[list[str], list[dict]]:
        """The streamed completion's tokens (one text piece each) and its events. Each
        call is cache-cold (its own salt): runs compare the same arithmetic."""
        self.calls += 1
        request = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "stream": True}
        request |= {"min_tokens": TOKENS, "logprobs": 0, "cache_salt": str(self.calls), **body}
        tokens: list[str] = []
        events: list[dict] = []
        with self.client.stream("POST", "/v1/completions", json=request) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                events.append(event)
                for choice in event.get("choices", []):
                    tokens += choice["logprobs"]["tokens"]
                if on_chunk is not None:
                    on_chunk(len(events))
        return tokens, events


@pytest.fixture(scope="module")
def front(stack: Stack) -> Iterator[Front]:
    holder: dict[str, Front] = {}
    app = build_http_app(lambda: holder["front"].pipeline)
    with serve_http(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        holder["front"] = Front(client)
        yield holder["front"]


def decode_server(checkpoint: LoadedCheckpoint, stack: Stack) -> DecodeServer:
    engine = AsyncEngine(
        EngineArgs(linear="int4", batch_invariant=True, **ENGINE).create_engine(checkpoint)  # type: ignore[arg-type]
    )
    return DecodeServer(engine, KVBridge(engine, [stack.shard.address], 5, 30), MODEL)


def pipeline(
    stack: Stack, *decode: Any, prefill: PrefillServer | None = None, **kw: Any
) -> DisaggregatedPipeline:
    card = stack.decode.describe()
    index = stack.pipeline.index
    assert isinstance(index, StorePrefixIndex)
    return DisaggregatedPipeline(
        stack.prefill.describe(),
        card,
        LocalPrefillPool(prefill or stack.prefill),
        LocalDecodePool(*decode),
        index,
        local_prefill_threshold=16,
        prefill_timeout_s=60,
        transfer_timeout_s=5,
        **kw,
    )


def wait_idle(stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while not stack.idle():
        assert time.monotonic() < deadline, "a pool still holds requests or blocks"
        time.sleep(0.05)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}])
def test_a_dead_decode_replica_loses_no_token(
    stack: Stack, front: Front, default_checkpoint: LoadedCheckpoint, sampling: dict
) -> None:
    front.pipeline = pipeline(stack, stack.decode)
    want, _ = front.stream(**sampling)
    assert len(want) == TOKENS
    victim = decode_server(default_checkpoint, stack)
    front.pipeline = migrating = pipeline(stack, victim, stack.decode)

    def kill(events: int) -> None:
        if events == 6:  # mid-stream: the client has six tokens
            victim.engine.shutdown()

    got, events = front.stream(on_chunk=kill, **sampling)
    assert got == want  # nothing lost, nothing twice, the same continuation
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert migrating.migrations == 1
    wait_idle(stack)
    assert stack.store_leases() == 0


def test_a_dead_prefill_replica_costs_a_local_prefill(
    stack: Stack, front: Front, default_checkpoint: LoadedCheckpoint
) -> None:
    front.pipeline = pipeline(stack, stack.decode)
    want, _ = front.stream(temperature=0)
    engine = AsyncEngine(
        EngineArgs(linear="fp8", batch_invariant=True, **ENGINE).create_engine(default_checkpoint)  # type: ignore[arg-type]
    )
    dead = PrefillServer(engine, KVBridge(engine, [stack.shard.address], 5, 30), MODEL)
    engine.shutdown()  # a replica that is gone
    front.pipeline = fallen_back = pipeline(stack, stack.decode, prefill=dead)
    got, _ = front.stream(temperature=0)
    assert fallen_back.local_prefills["prefill_error"] == 1
    # Decode prefilled with INT4 where the first token came from FP8 prefill before: the
    # request is served whole, though not necessarily with the same first tokens.
    assert len(got) == len(want) == TOKENS
    wait_idle(stack)


def test_a_stalled_decode_replica_is_abandoned(
    stack: Stack, front: Front, default_checkpoint: LoadedCheckpoint
) -> None:
    front.pipeline = pipeline(stack, stack.decode)
    want, _ = front.stream(temperature=0)
    stalled = Stalling(stack.decode, after=5)
    front.pipeline = migrating = pipeline(stack, stalled, stack.decode, stall_timeout_s=1.0)
    got, _ = front.stream(temperature=0)
    assert got == want and migrating.migrations == 1
    assert stalled.closed == 1  # the silent stream was closed: its engine request aborted
    wait_idle(stack)


def test_a_slow_kv_pull_is_not_taken_for_a_stall(
    stack: Stack,
    front: Front,
    default_checkpoint: LoadedCheckpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replica pulls the handoff's blocks for longer than the stall timeout (within the
    transfer timeout): it sends keepalives meanwhile, and the request stays where it is."""
    front.pipeline = pipeline(stack, stack.decode)
    want, _ = front.stream(temperature=0)
    server = decode_server(default_checkpoint, stack)
    assert server.bridge is not None
    fetch = server.bridge.fetch

    async def slow_fetch(*args: Any, **kwargs: Any) -> list[int]:
        await asyncio.sleep(2.5)  # a long prompt over a busy network
        return await fetch(*args, **kwargs)

    monkeypatch.setattr(server.bridge, "fetch", slow_fetch)
    try:
        front.pipeline = slow = pipeline(stack, server, stall_timeout_s=1.0)
        got, _ = front.stream(temperature=0)
        assert got == want and slow.migrations == 0
        assert not server.fallbacks  # decode started from the handoff's blocks

        # A client gone during the pull: the pull stops, and nothing stays held.
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "stream": True}
        with front.client.stream("POST", "/v1/completions", json=body | {"cache_salt": "gone"}):
            time.sleep(1.0)  # the replica is in its 2.5 s pull
        deadline = time.monotonic() + 30
        while not server.engine.call(
            lambda e: not e.has_unfinished and e.pool.num_free_blocks == e.pool.num_blocks
        ):
            assert time.monotonic() < deadline, "the replica still holds blocks"
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while stack.store_leases():  # the handoff's lease, released by the abandoned pull
            assert time.monotonic() < deadline, "the handoff's lease was not released"
            time.sleep(0.1)
    finally:
        server.engine.shutdown()
    wait_idle(stack)


def test_a_pull_stuck_past_its_transfer_timeout_goes_silent(
    stack: Stack, default_checkpoint: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull whose end waits on a hung engine step (its release queues behind the step)
    outlives its transfer timeout: keepalives sent for all of it would hide the hung
    replica from the router's stall clock, so they stop at the transfer timeout."""
    server = decode_server(default_checkpoint, stack)
    assert server.bridge is not None
    card = server.describe()

    async def stuck_fetch(*args: Any, **kwargs: Any) -> list[int]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(2.0)  # the release it queued waits for the hung step
            raise
        return []

    monkeypatch.setattr(server.bridge, "fetch", stuck_fetch)
    prompt = card.tokenizer.encode(PROMPT)
    request = DecodeRequest(
        "stuck", prompt, SamplingParams(max_tokens=2, temperature=0), transfer_timeout_s=0.5,
        stored_hashes=[b"\0" * 32], stored_fingerprint=card.fingerprint, keepalive_s=0.1,
    )  # fmt: skip

    async def outputs() -> list[tuple[float, RequestOutput]]:
        start = time.monotonic()
        return [(time.monotonic() - start, out) async for out in server.generate(request)]

    try:
        timed = asyncio.run(outputs())
    finally:
        server.engine.shutdown()
    keepalives = [t for t, out in timed if not out.new_token_ids and not out.finished]
    first_token = min(t for t, out in timed if out.new_token_ids)
    assert max(keepalives) < 1.0 and first_token > 2.0, (keepalives, first_token)
    assert server.fallbacks["kv_timeout"] == 1  # then it prefilled the prompt itself


def test_a_request_no_replica_would_serve_gets_503(stack: Stack, front: Front) -> None:
    """Every replica tried stalled: the service is unavailable (retry later), not broken."""
    stalled = Stalling(stack.decode, after=0)
    front.pipeline = pipeline(stack, stalled, stall_timeout_s=1.0, max_migrations=1)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "cache_salt": "503"}
    r = front.client.post("/v1/completions", json=body)
    assert r.status_code == 503, r.text
    assert "no decode replica served the request (2 tried)" in r.json()["error"]["message"]
    assert stalled.closed == 2
    wait_idle(stack)


def test_a_request_waiting_for_a_replica_is_not_taken_for_a_stall(
    stack: Stack, front: Front
) -> None:
    """The stall clock starts when a replica takes the request up: waiting in front of it
    (three stall timeouts here) is no stall, and nothing migrates."""
    front.pipeline = pipeline(stack, stack.decode)
    want, _ = front.stream(temperature=0)
    front.pipeline = waiting = pipeline(stack, stack.decode, stall_timeout_s=1.0)
    waiting.decode = QueuedDecodePool(waiting.decode, 3.0)
    got, _ = front.stream(temperature=0)
    assert got == want and waiting.migrations == 0
    wait_idle(stack)


def test_a_request_queued_in_a_busy_replica_is_not_taken_for_a_stall(
    stack: Stack, front: Front, default_checkpoint: LoadedCheckpoint
) -> None:
    """One sequence at a time on the only decode replica: of three requests sent at once,
    the last waits about two requests' time, far past the stall timeout (half of one
    request's time), for its turn. None migrates and each gets what it would alone: a
    waiting request's replica sends empty outputs while its engine steps."""
    engine = AsyncEngine(
        EngineArgs(linear="int4", batch_invariant=True, max_num_seqs=1, **ENGINE).create_engine(  # type: ignore[arg-type]
            default_checkpoint
        )
    )
    server = DecodeServer(engine, KVBridge(engine, [stack.shard.address], 5, 30), MODEL)
    try:
        front.pipeline = pipeline(stack, server)
        started = time.monotonic()
        want, _ = front.stream(temperature=0)
        alone_s = time.monotonic() - started
        front.pipeline = queued = pipeline(stack, server, stall_timeout_s=max(0.5, alone_s / 2))
        with ThreadPoolExecutor(3) as pool:
            runs = list(
                pool.map(lambda i: front.stream(temperature=0, cache_salt=f"q{i}")[0], range(3))
            )
        assert runs == [want] * 3
        assert queued.migrations == 0
    finally:
        engine.shutdown()
    wait_idle(stack)


def test_a_request_that_cannot_finish_ends_before_its_deadline(stack: Stack, front: Front) -> None:
    """The only decode replica stalls after three tokens, every time: the request migrates
    until its deadline ends it. The deadline is twice an undisturbed request's time on
    this machine now, so a slow machine still sends the first tokens within it."""
    front.pipeline = pipeline(stack, stack.decode)
    started = time.monotonic()
    front.stream(temperature=0)
    deadline_s = max(2.5, 2 * (time.monotonic() - started))
    stalled = Stalling(stack.decode, after=3)
    front.pipeline = pipeline(
        stack, stalled, request_timeout_s=deadline_s, stall_timeout_s=1.0, max_migrations=1000
    )
    started = time.monotonic()
    tokens, events = front.stream(temperature=0)
    assert time.monotonic() - started < deadline_s + 5  # ends at its deadline, not later
    assert len(tokens) == 3  # what was sent stays sent, once
    assert events[-1]["error"]["code"] == "deadline_exceeded", events[-1]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "min_tokens": TOKENS}
    r = front.client.post("/v1/completions", json=body)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    wait_idle(stack)
