"""The router's request path without Ray: real FP8 prefill and INT4 decode engines, a real
KV store shard process, real HTTP. Faults are real too: a killed shard, a prefill that
misses its deadline, a full router."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.handoff import Handoff
from engine.loaders import LoadedCheckpoint
from services.pool_requests import PoolStats, PrefillRequest
from services.router.http_api import build_http_app
from services.router.pool_clients import LocalDecodePool, LocalPrefillPool
from tests.services.router.conftest import serve_http
from tests.services.stack import MODEL, QueuedDecodePool, Stack

LONG = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely. Question: when do you open?"
)


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


def test_a_short_rest_after_a_stored_prefix_is_computed_by_decode_from_the_store(
    stack: Stack, http: httpx.Client, default_checkpoint: LoadedCheckpoint
) -> None:
    first = complete(http, LONG, cache_salt="rest")
    assert first.status_code == 200
    short = stack.pipeline.local_prefills["short_prompt"]
    computed = stack.decode_engine.call(lambda e: e.stats.computed_tokens)
    r = complete(http, LONG + " And Mondays?", cache_salt="rest")
    assert r.status_code == 200, r.text
    assert stack.pipeline.local_prefills["short_prompt"] == short + 1  # no remote prefill
    prompt = r.json()["usage"]["prompt_tokens"]
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    stored = len(default_checkpoint.tokenizer.encode(LONG)) // 16 * 16
    assert cached == stored > 0  # the stored blocks, not recomputed by decode
    steps = stack.decode_engine.call(lambda e: e.stats.computed_tokens) - computed
    assert steps == prompt - cached + r.json()["usage"]["completion_tokens"] - 1
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
    assert stack.pipeline.remote_prefills == 0  # the abandoned prefill left the queue
    wait_idle(stack)


def test_a_full_prefill_queue_sends_prompts_to_local_prefill(
    stack: Stack, http: httpx.Client
) -> None:
    """Conditional disaggregation: with `max_remote_prefills` already in flight, a long
    prompt prefills on its decode replica; the prefill pool computes nothing for it."""

    def computed(engine: AsyncEngine) -> int:
        return engine.call(lambda e: e.stats.computed_tokens)

    remote = complete(http, "On Fridays: " + LONG, cache_salt="queue-remote")
    assert remote.status_code == 200, remote.text
    assert stack.pipeline.remote_prefills == 0
    bound = stack.pipeline.max_remote_prefills
    stack.pipeline.max_remote_prefills = 0  # every remote slot taken
    prefilled, decoded = computed(stack.prefill_engine), computed(stack.decode_engine)
    try:
        local = complete(http, "On Fridays: " + LONG, cache_salt="queue-local", ignore_eos=True)
    finally:
        stack.pipeline.max_remote_prefills = bound
    assert local.status_code == 200, local.text
    assert stack.pipeline.local_prefills["prefill_busy"] == 1
    usage = local.json()["usage"]
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert computed(stack.prefill_engine) == prefilled
    assert computed(stack.decode_engine) - decoded == usage["prompt_tokens"] + 8 - 1
    wait_idle(stack)
    assert stack.store_leases() == 0


def test_a_handoff_abandoned_before_decode_pulls_it_releases_its_lease(
    stack: Stack, http: httpx.Client
) -> None:
    """Only decode's pull released the handoff's lease, so a request that ran out of time
    while its decode replica had not started left the prompt's blocks pinned in the store
    for the lease's whole TTL (30 s here); the router now releases it."""
    pipeline = stack.pipeline
    decode, timeout = pipeline.decode, pipeline.request_timeout_s
    assert isinstance(decode, LocalDecodePool)
    pipeline.decode, pipeline.request_timeout_s = QueuedDecodePool(decode, 60.0), 3.0
    try:
        r = complete(http, "On Mondays: " + LONG)  # nothing cached: a remote prefill
    finally:
        pipeline.decode, pipeline.request_timeout_s = decode, timeout
    assert r.status_code == 504, r.text
    deadline = time.monotonic() + 5  # well inside the lease's TTL
    while stack.store_leases() != 0:
        assert time.monotonic() < deadline, "the abandoned handoff's lease is still held"
        time.sleep(0.1)
    wait_idle(stack)


class SlowAnswerPrefillPool:
    """The stack's prefill pool whose answer comes back late (a slow return path): the
    replica has exported the handoff before the router stops waiting."""

    def __init__(self, inner: LocalPrefillPool, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.exported: list[str] = []

    async def prefill(self, request: PrefillRequest) -> Handoff:
        handoff = await self.inner.prefill(request)
        self.exported.append(handoff.lease_id)
        await asyncio.sleep(self.delay_s)
        return handoff

    async def stats(self) -> list[PoolStats]:
        return await self.inner.stats()


def test_a_prefill_answer_given_up_on_releases_its_lease(stack: Stack, http: httpx.Client) -> None:
    """The router chooses the handoff's lease id, so when it stops waiting for a prefill
    that has already exported, it can release what the lease pins (before, only the
    dropped answer knew the id, and the blocks stayed pinned for the TTL, 30 s here)."""
    pipeline = stack.pipeline
    prefill, timeout = pipeline.prefill, pipeline.prefill_timeout_s
    assert isinstance(prefill, LocalPrefillPool)
    slow = SlowAnswerPrefillPool(prefill, 60.0)
    pipeline.prefill, pipeline.prefill_timeout_s = slow, 5.0
    try:
        r = complete(http, "On Tuesdays: " + LONG, ignore_eos=True)  # a remote prefill
    finally:
        pipeline.prefill, pipeline.prefill_timeout_s = prefill, timeout
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert len(slow.exported) == 1 and slow.exported[0]  # the replica did export
    deadline = time.monotonic() + 5  # well inside the lease's TTL
    while stack.store_leases() != 0:
        assert time.monotonic() < deadline, "the late prefill's lease is still held"
        time.sleep(0.1)
    wait_idle(stack)


def test_a_dead_shard_costs_cache_hits_not_requests(stack: Stack, http: httpx.Client) -> None:
    """Stops the module's shard: the module's last test."""
    stack.shard.stop()
    r = complete(http, "On holidays: " + LONG)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert stack.prefill.fallbacks["kv_export"] == 1
    wait_idle(stack)
