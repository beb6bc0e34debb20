"""Metrics sources over real HTTP: pools' /metrics pages (prometheus_client text) and a
Prometheus HTTP API, reduced to the engine's MetricsWindow."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import AsyncIterator

import aiohttp
import aiohttp.web
import pytest
from prometheus_client import generate_latest

from operators.exposition import Exposition
from operators.histogram import Histogram
from operators.metrics_source import MetricsUnavailable
from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.pool_policy import Pool
from operators.prometheus_source import PrometheusSource
from operators.scrape_source import ScrapeSource
from tests.operator.telemetry_page import TelemetryPage

INF = math.inf


def test_histogram_quantile_is_prometheus_histogram_quantile() -> None:
    h = Histogram(((0.1, 3.0), (0.5, 9.0), (1.0, 10.0), (INF, 10.0)))
    assert h.quantile(0.9) == pytest.approx(0.5)  # rank 9 ends the (0.1, 0.5] bucket
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.4 * 2 / 6)  # linear inside it
    assert h.quantile(0.2) == pytest.approx(0.1 * 2 / 3)  # first bucket starts at 0
    assert Histogram(((0.1, 1.0), (INF, 10.0))).quantile(0.9) == 0.1  # +Inf: last finite bound
    assert Histogram(((0.1, 0.0), (INF, 0.0))).quantile(0.9) is None


def test_histogram_difference_and_reset() -> None:
    before = Histogram(((0.1, 2.0), (INF, 4.0)))
    after = Histogram(((0.1, 5.0), (INF, 9.0)))
    assert after.since(before) == Histogram(((0.1, 3.0), (INF, 5.0)))
    restarted = Histogram(((0.1, 1.0), (INF, 1.0)))
    assert restarted.since(after) == restarted
    assert before + after == Histogram(((0.1, 7.0), (INF, 13.0)))


def test_exposition_keeps_the_engine_series_of_one_model() -> None:
    page = TelemetryPage()
    page.waiting.labels("prefill", "a").set(3)
    page.waiting.labels("prefill", "b").set(5)
    page.waiting.labels("router", "a").set(100)  # not a pool the engine sizes
    page.prompt_tokens.labels("prefill", "a").inc(700)
    page.ttft.labels("prefill", "a").observe(0.3)
    text = generate_latest(page.registry).decode()
    everything = Exposition.parse(text)
    assert everything.of(Pool.PREFILL).gauges["num_requests_waiting"] == (3.0, 5.0)
    only_a = Exposition.parse(text, model="a").of(Pool.PREFILL)
    assert only_a.gauges == {"num_requests_waiting": (3.0,)}
    assert only_a.counters == {"prompt_tokens_total": 700.0}
    assert only_a.histograms["time_to_first_token_seconds"].count == 1
    assert Exposition.parse(text).of(Pool.DECODE).gauges == {}
    with pytest.raises(ValueError):
        Exposition.parse("baton_num_requests_waiting{pool=prefill} nope")


def test_samples_that_are_not_numbers_are_no_data() -> None:
    page = TelemetryPage()
    page.waiting.labels("decode", "a").set(math.inf)  # the pool's only waiting series
    page.kv_usage.labels("decode", "a").set(math.nan)
    page.kv_usage.labels("decode", "b").set(0.5)  # another replica's is fine
    page.running.labels("decode", "a").set(-math.inf)
    page.generation_tokens.labels("decode", "a").inc(300)
    page.generation_tokens.labels("decode", "b").inc(math.nan)
    decode = Exposition.parse(generate_latest(page.registry).decode()).of(Pool.DECODE)
    assert decode.gauges == {"kv_cache_usage_ratio": (0.5,)}
    assert decode.counters == {"generation_tokens_total": 300.0}


def test_negative_samples_are_no_data() -> None:
    """Latencies, counts, ratios and rates are never below zero: such a sample is a broken
    exporter, refused like NaN, not summed into the pool's figures."""
    text = """\
baton_num_requests_waiting{pool="decode",model="a"} -3
baton_num_requests_waiting{pool="decode",model="b"} 4
baton_kv_cache_usage_ratio{pool="decode",model="a"} -0.5
baton_num_requests_running{pool="decode",model="a"} 0
baton_generation_tokens_total{pool="decode",model="a"} -300
baton_generation_tokens_total{pool="decode",model="b"} 200
"""
    decode = Exposition.parse(text).of(Pool.DECODE)
    assert decode.gauges == {"num_requests_waiting": (4.0,), "num_requests_running": (0.0,)}
    assert decode.counters == {"generation_tokens_total": 200.0}


class TickingClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def pages() -> AsyncIterator[tuple[TelemetryPage, TelemetryPage]]:
    a, b = TelemetryPage(), TelemetryPage()
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def test_scrape_source_windows_are_differences_between_reads(
    pages: tuple[TelemetryPage, TelemetryPage], session: aiohttp.ClientSession
) -> None:
    a, b = pages
    clock = TickingClock()
    source = ScrapeSource([a.url, b.url], session, model="m", clock=clock)
    for page, usage in ((a, 0.5), (b, 0.7)):
        page.waiting.labels("decode", "m").set(2)
        page.kv_usage.labels("decode", "m").set(usage)
        page.ttft.labels("prefill", "m").observe(0.03)  # (0.02, 0.04] bucket
        page.prompt_tokens.labels("prefill", "m").inc(1000)
    first = await source.window()
    # no previous read: no window to take percentiles or rates over
    assert first.prefill.ttft_p90_s is None
    assert first.prefill.prompt_tokens_per_s is None and first.prefill.request_rate is None
    assert first.decode.requests_waiting == 4
    assert first.decode.kv_cache_usage == pytest.approx(0.6)

    clock.now += 10
    for _ in range(10):
        a.ttft.labels("prefill", "m").observe(0.7)  # (0.5, 0.75] bucket
    a.prompt_tokens.labels("prefill", "m").inc(3000)
    b.prompt_tokens.labels("prefill", "m").inc(1000)
    b.generation_tokens.labels("decode", "m").inc(500)
    second = await source.window()
    assert second.prefill.ttft_p90_s == pytest.approx(0.5 + 0.25 * 0.9)  # the 10 new ones
    assert dataclasses.replace(second.prefill, ttft_p90_s=None) == PoolMetrics(
        request_rate=1.0,
        prompt_tokens_per_s=400.0,  # (3000 + 1000) / 10 s
        generation_tokens_per_s=None,  # no prefill series of it
    )
    assert second.output_tokens_per_s == 50.0
    assert second.decode.itl_p90_s is None  # no observations at all

    await b.stop()  # one replica gone: the window is the other's
    clock.now += 10
    third = await source.window()
    assert third.decode.requests_waiting == 2
    assert third.prefill.ttft_p90_s is None  # nothing finished in this window
    await a.stop()
    with pytest.raises(MetricsUnavailable, match="no /metrics endpoint answered"):
        await source.window()


async def test_a_first_read_is_no_window_of_the_histories_before_it(
    pages: tuple[TelemetryPage, TelemetryPage], session: aiohttp.ClientSession
) -> None:
    """A restarted operator (or a `metrics` edit, or `baton serve`'s autoscaler restarting)
    reads a long-lived router: an incident over long ago must not read as this minute's."""
    a, _ = pages
    for _ in range(1000):
        a.ttft.labels("prefill", "m").observe(2.0)  # the old incident
    for _ in range(50):
        a.ttft.labels("prefill", "m").observe(0.05)  # the last minute, healthy
    a.waiting.labels("prefill", "m").set(0)
    clock = TickingClock()
    source = ScrapeSource([a.url], session, model="m", clock=clock)
    first = await source.window()
    assert first.prefill == PoolMetrics(requests_waiting=0.0)  # gauges are instant: read

    clock.now += 15
    for _ in range(30):
        a.ttft.labels("prefill", "m").observe(0.05)  # (0.04, 0.06] bucket
    for _ in range(10):
        a.itl.labels("decode", "m").observe(0.02)  # a series first seen now counts in full
    second = await source.window()
    assert second.prefill.ttft_p90_s == pytest.approx(0.04 + 0.02 * 0.9)
    assert second.prefill.request_rate == 2.0  # 30 first tokens in 15 s
    assert second.decode.itl_p90_s == pytest.approx(0.01 + 0.015 * 0.9)  # (0.01, 0.025]


@pytest.fixture
async def prometheus() -> AsyncIterator[tuple[str, dict[str, str], list[str]]]:
    """A Prometheus HTTP API stand-in: answers instant queries from a table."""
    answers: dict[str, str] = {}
    asked: list[str] = []

    async def query(request: aiohttp.web.Request) -> aiohttp.web.Response:
        expr = request.query["query"]
        asked.append(expr)
        if "nonsense_" in expr:  # a prefix this Prometheus cannot parse
            return aiohttp.web.json_response(
                {"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400
            )
        value = answers.get(expr)
        result = [] if value is None else [{"metric": {}, "value": [1767225600, value]}]
        return aiohttp.web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/", answers, asked
    await runner.cleanup()


async def test_prometheus_source_asks_promql_per_pool(
    prometheus: tuple[str, dict[str, str], list[str]], session: aiohttp.ClientSession
) -> None:
    url, answers, asked = prometheus
    source = PrometheusSource(url, session, model="m", selector='namespace="llm"', rate_window="2m")
    queries = source.queries(Pool.PREFILL)
    assert queries["ttft_p90_s"] == (
        "histogram_quantile(0.9, sum by (le) (rate(baton_time_to_first_token_seconds_bucket"
        '{pool="prefill",model="m",namespace="llm"}[2m])))'
    )
    assert queries["requests_waiting"] == (
        'sum(baton_num_requests_waiting{pool="prefill",model="m",namespace="llm"})'
    )
    answers[queries["ttft_p90_s"]] = "0.42"
    answers[queries["prompt_tokens_per_s"]] = "1500"
    answers[queries["requests_waiting"]] = "NaN"  # Prometheus' answer for 0/0
    answers[queries["requests_running"]] = "+Inf"
    decode = source.queries(Pool.DECODE)
    answers[decode["kv_cache_usage"]] = "0.75"
    answers[decode["kv_transfer_p90_s"]] = "0.08"
    answers[decode["requests_waiting"]] = "-Inf"
    answers[decode["requests_running"]] = "-2"  # a sum over a gauge that went below zero

    window = await source.window()
    assert window == MetricsWindow(
        prefill=PoolMetrics(ttft_p90_s=0.42, prompt_tokens_per_s=1500.0),
        decode=PoolMetrics(kv_cache_usage=0.75, kv_transfer_p90_s=0.08),
    )
    assert sorted(asked) == sorted([*queries.values(), *decode.values()])


async def test_prometheus_source_failures(
    prometheus: tuple[str, dict[str, str], list[str]], session: aiohttp.ClientSession
) -> None:
    url, _, _ = prometheus
    source = PrometheusSource(url, session, metric_prefix="nonsense_")
    with pytest.raises(MetricsUnavailable, match="parse error"):
        await source.window()
    gone = PrometheusSource("http://127.0.0.1:1/", session)
    with pytest.raises(MetricsUnavailable, match=re.escape("Prometheus at http://127.0.0.1:1/")):
        await gone.window()
