"""Telemetry's page: exact text, how replicas' series merge, and what the router keeps of
a replica that went away. The operator's parser reads the page the way it reads a pool's."""

from __future__ import annotations

import asyncio
import logging
import pickle

import pytest
from prometheus_client.parser import text_string_to_metric_families

from operators.exposition import Exposition, PoolSeries
from operators.pool_policy import Pool
from services.router.metrics_page import MetricsPage, RouterSeries
from services.telemetry import (
    E2E,
    FALLBACKS,
    ITL,
    KV_USAGE,
    PROMPT_TOKENS,
    RUNNING,
    TTFT,
    WAITING,
    Reading,
    Snapshot,
    Telemetry,
    render,
)


def replica(running: int, usage: float, prompt_tokens: int, ttft: float) -> Telemetry:
    t = Telemetry("decode", "m")
    t.observe(
        lambda: [
            Reading(RUNNING, running),
            Reading(KV_USAGE, usage),
            Reading(PROMPT_TOKENS, prompt_tokens),
        ]
    )
    t.record(TTFT, ttft)
    return t


def test_page_text_labels_and_vllm_aliases() -> None:
    t = Telemetry("decode", "m")
    t.observe(lambda: [Reading(WAITING, 3), Reading(FALLBACKS, 2, {"reason": "kv_miss"})])
    t.record(ITL, 0.03)
    text = render(t.collect())
    assert text.splitlines() == [
        "# HELP baton_inter_token_latency_seconds "
        "Time between two tokens of a request's stream, as the router receives them.",
        "# TYPE baton_inter_token_latency_seconds histogram",
        *(
            f'baton_inter_token_latency_seconds_bucket{{pool="decode",model="m",le="{le}"}} '
            f"{int(le != '0.01' and le != '0.025')}"
            for le in (
                *("0.01", "0.025", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.4", "0.5"),
                *("0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "+Inf"),
            )
        ),
        'baton_inter_token_latency_seconds_count{pool="decode",model="m"} 1',
        'baton_inter_token_latency_seconds_sum{pool="decode",model="m"} 0.03',
        "# HELP baton_num_requests_waiting Requests queued for a batch.",
        "# TYPE baton_num_requests_waiting gauge",
        'baton_num_requests_waiting{pool="decode",model="m"} 3.0',
        "# HELP vllm:num_requests_waiting Requests queued for a batch.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{pool="decode",model="m"} 3.0',
        "# HELP baton_local_prefill_fallback_total "
        "Requests the decode pool prefilled itself, by reason.",
        "# TYPE baton_local_prefill_fallback_total counter",
        'baton_local_prefill_fallback_total{pool="decode",model="m",reason="kv_miss"} 2.0',
    ]


def test_replicas_merge_per_pool_and_the_operator_reads_them() -> None:
    a, b = replica(2, 0.5, 100, 0.03), replica(1, 0.25, 40, 0.3)
    page = render([*a.collect(), *b.collect()])
    decode = Exposition.parse(page, "m").of(Pool.DECODE)
    assert decode.gauges == {"num_requests_running": (3.0,), "kv_cache_usage_ratio": (0.375,)}
    assert decode.counters == {"prompt_tokens_total": 140.0}
    ttft = decode.histograms["time_to_first_token_seconds"]
    assert ttft.count == 2 and dict(ttft.buckets)[0.04] == 1 and dict(ttft.buckets)[0.5] == 2


def test_the_router_keeps_a_gone_replicas_totals_not_its_gauges() -> None:
    a, b = replica(2, 0.5, 100, 0.03), replica(1, 0.25, 40, 0.3)
    live = [a, b]

    async def replicas() -> list[Snapshot]:
        # they cross Ray pickled
        return [pickle.loads(pickle.dumps(t.snapshot())) for t in live]

    page = MetricsPage(Telemetry("router", "m"), [replicas])
    first = Exposition.parse(asyncio.run(page.render()), "m").of(Pool.DECODE)
    live.remove(b)  # scaled away
    after = Exposition.parse(asyncio.run(page.render()), "m").of(Pool.DECODE)
    assert first.counters == after.counters == {"prompt_tokens_total": 140.0}
    assert after.histograms["time_to_first_token_seconds"].count == 2
    assert after.gauges == {"num_requests_running": (2.0,), "kv_cache_usage_ratio": (0.5,)}


def test_a_failing_pool_keeps_its_totals_and_drops_its_gauges_the_others_stay_live(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queues = {"decode": 7, "prefill": 2}
    prefill_answers = True
    pools = {pool: Telemetry(pool, "m") for pool in queues}
    for pool, t in pools.items():
        t.observe(lambda pool=pool: [Reading(WAITING, queues[pool]), Reading(PROMPT_TOKENS, 60)])

    async def decode_replicas() -> list[Snapshot]:
        return [pools["decode"].snapshot()]

    async def prefill_replicas() -> list[Snapshot]:
        if not prefill_answers:
            raise RuntimeError("ActorDiedError")
        return [pools["prefill"].snapshot()]

    page = MetricsPage(Telemetry("router", "m"), [decode_replicas, prefill_replicas])

    def read() -> Exposition:
        return Exposition.parse(asyncio.run(page.render()), "m")

    read()
    prefill_answers, queues["decode"] = False, 0  # decode drained while prefill fails
    with caplog.at_level(logging.WARNING, "services.router.metrics_page"):
        for _ in range(2):
            now = read()
            assert now.of(Pool.DECODE).gauges == {"num_requests_waiting": (0.0,)}
            assert now.of(Pool.PREFILL).gauges == {}
            assert now.of(Pool.PREFILL).counters == {"prompt_tokens_total": 60.0}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "reading test_a_failing_pool_keeps_its_totals_and_drops_its_gauges_the_others_stay_"
        "live.<locals>.prefill_replicas failed; serving its totals without its gauges until "
        "it answers: RuntimeError('ActorDiedError')"
    ]  # once per outage, not per scrape
    prefill_answers, queues["prefill"] = True, 1
    assert read().of(Pool.PREFILL).gauges == {"num_requests_waiting": (1.0,)}


def test_every_router_replica_serves_the_sum_over_all_router_replicas() -> None:
    routers = [Telemetry("router", "m") for _ in range(2)]
    for t, seconds in zip(routers, ([0.2, 2.0], [0.2]), strict=True):
        for s in seconds:
            t.record(E2E, s)
    decode = replica(2, 0.5, 100, 0.03)

    async def decode_replicas() -> list[Snapshot]:
        return [decode.snapshot()]

    async def router_replicas() -> list[RouterSeries]:
        return [pickle.loads(pickle.dumps(p.shared())) for p in pages]

    pages = [MetricsPage(t, [decode_replicas], router_replicas) for t in routers]
    for page in pages:
        text = asyncio.run(page.render())
        e2e = {
            (s.name, s.labels.get("le")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith(E2E.name) and s.labels["pool"] == "router"
        }
        assert e2e[f"{E2E.name}_count", None] == 3
        assert e2e[f"{E2E.name}_bucket", "0.3"] == 2 and e2e[f"{E2E.name}_bucket", "1.5"] == 2
        assert e2e[f"{E2E.name}_bucket", "2.0"] == 3
        decode_series = Exposition.parse(text, "m").of(Pool.DECODE)
        assert decode_series.counters == {"prompt_tokens_total": 100.0}  # once, not per router
        assert decode_series.gauges["num_requests_running"] == (2.0,)


def test_a_router_that_starts_later_hears_the_totals_of_replicas_gone_before() -> None:
    a, b = replica(2, 0.5, 100, 0.03), replica(1, 0.25, 40, 0.3)
    live = [a, b]
    old, new = MetricsPage(Telemetry("router", "m"), []), MetricsPage(Telemetry("router", "m"), [])
    routers = [old]

    async def decode_replicas() -> list[Snapshot]:
        return [t.snapshot() for t in live]

    async def router_replicas() -> list[RouterSeries]:
        return [p.shared() for p in routers]

    for page in (old, new):
        page.pools, page.peers = [decode_replicas], router_replicas

    def decode(page: MetricsPage) -> PoolSeries:
        return Exposition.parse(asyncio.run(page.render()), "m").of(Pool.DECODE)

    decode(old)
    live.remove(b)  # scaled away before the new router replica started
    routers.append(new)
    assert decode(new).counters == decode(old).counters == {"prompt_tokens_total": 140.0}
    routers.remove(old)  # restarted in turn: what it kept stays with the new one
    after = decode(new)
    assert after.counters == {"prompt_tokens_total": 140.0}
    assert after.histograms["time_to_first_token_seconds"].count == 2
    assert after.gauges == {"num_requests_running": (2.0,), "kv_cache_usage_ratio": (0.5,)}
