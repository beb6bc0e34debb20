"""Telemetry through the real request path: FP8 prefill and INT4 decode engines, a KV store
shard, the router pipeline and its HTTP front end, all on one event loop thread (so the
shard's spans land in this process's exporter too).

After one request, the router's and the shard's /metrics name every DESIGN.md metric with
the request's exact counts, and the request is one trace across router -> prefill -> kv
put -> kv get -> decode, the shard's RPCs included (their context came as gRPC metadata).

Tracing is switched on for this process before the stack starts (an OpenTelemetry
provider can be set once per process; later test modules run with it on).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx2 as httpx
import pytest
import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from services.decode.server import DecodeServer
from services.kv_bridge import KVBridge
from services.kvstore.client import ClientConfig, KVStoreClient
from services.kvstore.metrics_endpoint import MetricsEndpoint
from services.kvstore.server import KVStoreServer, ServerConfig
from services.prefill.server import PrefillServer
from services.router.disaggregated import DisaggregatedPipeline
from services.router.http_api import build_http_app
from services.router.instrumented_pipeline import InstrumentedPipeline
from services.router.metrics_page import MetricsPage, pipeline_readings
from services.router.pool_clients import LocalDecodePool, LocalPrefillPool, StorePrefixIndex
from services.telemetry import METRICS, Telemetry
from services.tracing import tracing_enabled
from tests.services.stack import free_port

MODEL = "smollm2-135m-instruct"
PROMPT = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely. Question: "
)
T = TypeVar("T")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class TracedStack:
    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.shard = self.run(self._start_shard())

        def engine(linear: str) -> AsyncEngine:
            args = EngineArgs(linear=linear, max_model_len=512, kv_cache_bytes=32 * 2**20)
            return AsyncEngine(args.create_engine(checkpoint))

        self.engines = [engine("fp8"), engine("int4")]
        target = [self.shard.address]
        self.prefill = PrefillServer(
            self.engines[0], KVBridge(self.engines[0], target, 5, 30), MODEL
        )
        self.decode = DecodeServer(self.engines[1], KVBridge(self.engines[1], target, 5, 30), MODEL)
        card = self.decode.describe()
        index = KVStoreClient(
            target, card.fingerprint, card.block_format, ClientConfig(timeout_s=5)
        )
        pipeline = DisaggregatedPipeline(
            self.prefill.describe(),
            card,
            LocalPrefillPool(self.prefill),
            LocalDecodePool(self.decode),
            StorePrefixIndex(index),
            local_prefill_threshold=16,
            prefill_timeout_s=60,
            transfer_timeout_s=5,
        )
        telemetry = Telemetry("router", MODEL)
        telemetry.observe(lambda: pipeline_readings(pipeline))
        page = MetricsPage(
            telemetry,
            [LocalPrefillPool(self.prefill).metrics, LocalDecodePool(self.decode).metrics],
        )
        routed = InstrumentedPipeline(pipeline, telemetry)
        app = build_http_app(lambda: routed, metrics=page.render)
        port = free_port()
        self.http = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self.serving = asyncio.run_coroutine_threadsafe(self.http.serve(), self.loop)
        while not self.http.started:
            assert not self.serving.done(), self.serving.result()
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"

    def run(self, work: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout=120)

    async def _start_shard(self) -> KVStoreServer:
        config = ServerConfig("t0", 128 * 2**20, host="127.0.0.1", port=0, shared_memory_dir=None)
        shard = KVStoreServer(config)
        await shard.start()
        self.shard_metrics = MetricsEndpoint(shard.store, "127.0.0.1", 0)
        await self.shard_metrics.start()
        return shard

    def close(self) -> None:
        self.http.should_exit = True
        self.serving.result(timeout=30)
        for e in self.engines:
            e.shutdown()
        self.run(self.shard_metrics.stop())
        self.run(self.shard.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    if not tracing_enabled():
        trace.set_tracer_provider(TracerProvider())
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def stack(
    spans: InMemorySpanExporter, default_checkpoint: LoadedCheckpoint
) -> Iterator[TracedStack]:
    s = TracedStack(default_checkpoint)
    yield s
    s.close()


def samples(url: str) -> tuple[set[str], Samples]:
    """The page's metric names (families, samples included) and every sample's value."""
    text = httpx.get(url, timeout=30).raise_for_status().text
    names: set[str] = set()
    values: Samples = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        for s in family.samples:
            names.add(s.name)
            values[s.name, tuple(sorted(s.labels.items()))] = s.value
    return names, values


def value(values: Samples, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def complete(stack: TracedStack, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_router_page_has_every_metric_with_the_requests_counts(stack: TracedStack) -> None:
    router = f"{stack.url}/metrics"
    _, before = samples(router)
    usage = complete(stack, PROMPT + "when do you open?", 6)["usage"]
    names, after = samples(router)
    for metric in METRICS:
        assert metric.name in names, metric.name
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= names

    def delta(name: str, **labels: str) -> float:
        labels = {"model": MODEL, **labels}
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("baton_time_to_first_token_seconds_count", pool="prefill") == 1
    assert delta("baton_time_to_first_token_seconds_count", pool="decode") == 0
    assert delta("baton_e2e_request_latency_seconds_count", pool="router") == 1
    assert delta("baton_inter_token_latency_seconds_count", pool="decode") == 6 - 1
    assert delta("baton_request_queue_time_seconds_count", pool="prefill") == 1
    assert delta("baton_request_queue_time_seconds_count", pool="decode") == 1
    assert delta("baton_prompt_tokens_total", pool="prefill") == usage["prompt_tokens"]
    assert (
        delta("baton_prefix_cache_queried_tokens_total", pool="prefill") == usage["prompt_tokens"]
    )
    assert delta("baton_generation_tokens_total", pool="decode") == 6 - 1  # prefill sampled one
    # Every full block of the new prompt went to the store and came back to decode.
    block = stack.engines[0].engine.block_format.nbytes
    blocks = (usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]) // 16
    assert delta("baton_kv_transfer_bytes_total", pool="prefill", direction="put") == blocks * block
    assert delta("baton_kv_transfer_bytes_total", pool="decode", direction="get") == blocks * block
    assert delta("baton_kv_transfer_seconds_count", pool="prefill", direction="put") == 1
    # Decode computed only the prompt's tail past the blocks it pulled, and what it pulled
    # is no hit of its prefix cache (nor a lookup in it).
    assert delta("baton_prompt_tokens_total", pool="decode") == usage["prompt_tokens"] % 16
    assert delta("baton_prefix_cache_hit_tokens_total", pool="decode") == 0
    tail = usage["prompt_tokens"] % 16
    assert delta("baton_prefix_cache_queried_tokens_total", pool="decode") == tail
    assert delta("baton_kv_transfer_seconds_count", pool="decode", direction="get") == 1
    assert value(after, "baton_request_migrations_total", pool="decode", model=MODEL) == 0
    assert value(after, "baton_num_requests_running", pool="decode", model=MODEL) == 0
    assert value(after, "vllm:kv_cache_usage_perc", pool="decode", model=MODEL) == value(
        after, "baton_kv_cache_usage_ratio", pool="decode", model=MODEL
    )


def test_short_prompts_count_as_local_prefill_fallbacks(stack: TracedStack) -> None:
    _, before = samples(f"{stack.url}/metrics")
    complete(stack, "Hi", 2)
    _, after = samples(f"{stack.url}/metrics")
    labels = {"pool": "decode", "model": MODEL, "reason": "short_prompt"}
    name = "baton_local_prefill_fallback_total"
    assert value(after, name, **labels) - value(before, name, **labels) == 1
    # Decode computed the first token: its TTFT is decode's, not the prefill pool's.
    ttft = "baton_time_to_first_token_seconds_count"
    for pool, n in (("decode", 1), ("prefill", 0)):
        labels = {"pool": pool, "model": MODEL}
        assert value(after, ttft, **labels) - value(before, ttft, **labels) == n, pool


def test_shard_page_counts_its_transfers(stack: TracedStack) -> None:
    page = f"http://127.0.0.1:{stack.shard_metrics.port}/metrics"
    _, before = samples(page)
    complete(stack, "On weekends: " + PROMPT + "can I renew a book by phone?", 2)
    count = "baton_kv_transfer_seconds_count"
    put = {"pool": "kvstore", "direction": "put", "transport": "grpc"}
    get = {**put, "direction": "get"}

    def counted() -> bool:  # the shard counts a get once its stream has ended
        _, now = samples(page)
        return all(
            value(now, count, **labels) - value(before, count, **labels) == 1
            for labels in (put, get)
        )

    eventually(counted)
    names, after = samples(page)
    assert {
        "baton_kv_transfer_bytes_total",
        "baton_kv_transfer_seconds",
        "baton_kv_cache_usage_ratio",
        "baton_kv_store_blocks",
        "baton_kv_store_hits_total",
    } <= names
    assert all(dict(labels)["pool"] == "kvstore" for _, labels in after)
    moved = "baton_kv_transfer_bytes_total"
    assert (
        value(after, moved, **put) - value(before, moved, **put)
        == value(after, moved, **get) - value(before, moved, **get)
        > 0
    )
    assert 0 < value(after, "baton_kv_cache_usage_ratio", pool="kvstore") < 1


def test_a_request_is_one_trace_across_every_hop(
    stack: TracedStack, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    result = complete(stack, "For a visitor: " + PROMPT + "is there a reading room?", 3)

    def finished() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if s.name != "baton.v1.KVStore/Release"]

    hops = {"router", "prefill", "kv put", "baton.v1.KVStore/Put", "decode", "kv get"}
    hops.add("baton.v1.KVStore/Get")
    # Spans end as their work does: the shard's after its reply, the root after the response.
    eventually(
        lambda: hops <= {s.name for s in finished()} and any(not s.parent for s in finished())
    )
    by_name = {s.name: s for s in finished()}
    by_id = {s.context.span_id: s for s in finished()}
    assert len({s.context.trace_id for s in finished()}) == 1

    # The root: FastAPI's HTTP server span (it continues a client's traceparent), or the
    # router's own where the web framework makes none.
    root = router = by_name["router"]
    while root.parent is not None:
        root = by_id[root.parent.span_id]
    assert root.name in ("router", "POST /v1/completions")
    edges = {(by_id[s.parent.span_id].name, s.name) for s in finished() if s.parent}
    assert {
        ("router", "baton.v1.KVStore/Lookup"),  # the router's prefix lookup
        ("router", "prefill"),
        ("prefill", "kv put"),
        ("kv put", "baton.v1.KVStore/Put"),
        ("router", "decode"),
        ("decode", "kv get"),
        ("kv get", "baton.v1.KVStore/Get"),
    } <= edges
    usage = result["usage"]
    assert router.attributes is not None
    assert router.attributes["gen_ai.operation.name"] == "text_completion"
    assert router.attributes["gen_ai.request.model"] == MODEL
    assert router.attributes["gen_ai.request.max_tokens"] == 3
    assert router.attributes["gen_ai.request.temperature"] == 0
    assert router.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert router.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 3
    assert by_name["kv get"].attributes == {
        "baton.kv.blocks": by_name["kv put"].attributes["baton.kv.blocks"],  # type: ignore[index]
        "baton.kv.cached": 0,
        "baton.kv.received_blocks": by_name["kv put"].attributes["baton.kv.blocks"],  # type: ignore[index]
    }


def test_a_chat_requests_span_says_chat(stack: TracedStack, spans: InMemorySpanExporter) -> None:
    spans.clear()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    eventually(lambda: any(s.name == "router" for s in spans.get_finished_spans()))
    (router,) = [s for s in spans.get_finished_spans() if s.name == "router"]
    assert router.attributes is not None
    assert router.attributes["gen_ai.operation.name"] == "chat"


def test_kvstore_command_serves_metrics(tmp_path: Any) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "services.kvstore.main", "--host", "127.0.0.1"]
    cmd += ["--port", str(grpc_port), "--capacity", "16MiB", "--shard-id", "m0"]
    cmd += ["--no-shared-memory", "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def up() -> bool:
            assert proc.poll() is None, "the shard exited"
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        eventually(up, 60)
        _, values = samples(url)
        assert value(values, "baton_kv_store_capacity_bytes", pool="kvstore") == 16 * 2**20
        assert value(values, "baton_kv_cache_usage_ratio", pool="kvstore") == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
