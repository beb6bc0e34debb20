"""Signals: each objective's replica count from one metrics window, exactly."""

from __future__ import annotations

from operators.demand import Signal, recommendation, signals
from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.policy_engine import plan
from operators.policy_status import last_metrics
from operators.pool_policy import Capacity, Objectives, Pool, PoolPolicy
from operators.scaling_history import ScalingHistory


def prefill(**objectives: float) -> PoolPolicy:
    return PoolPolicy(Pool.PREFILL, 1, 100, Objectives(**objectives))


def decode(capacity: Capacity | None = None, **objectives: float) -> PoolPolicy:
    return PoolPolicy(Pool.DECODE, 1, 100, Objectives(**objectives), capacity or Capacity())


def test_ttft_is_the_measured_one_the_kv_pull_is_not_added_again() -> None:
    # the router's TTFT ends when the first token leaves decode: the KV pull is inside
    # the 0.725 s already (the reviewer's run: a pull slowed by 0.4 s, kv p90 0.475 s)
    window = MetricsWindow(
        prefill=PoolMetrics(ttft_p90_s=0.725), decode=PoolMetrics(kv_transfer_p90_s=0.475)
    )
    # 0.725 / 0.5 of the target: 2 replicas become ceil(2 * 1.45) = 3, not ceil(2 * 2.4) = 5
    assert signals(prefill(ttft_p90_s=0.5), window, 2) == (Signal("ttftP90Ms", 725.0, 500.0, 3),)
    assert last_metrics(window, Pool.PREFILL)["ttftP90Ms"] == 725.0


def test_ratio_inside_the_tolerance_keeps_the_size() -> None:
    window = MetricsWindow(decode=PoolMetrics(itl_p90_s=0.0525))  # 5% over 50 ms
    assert signals(decode(itl_p90_s=0.05), window, 7)[0].replicas == 7


def test_ratio_rounding_is_exact() -> None:
    window = MetricsWindow(decode=PoolMetrics(kv_cache_usage=0.4))
    # 3 * 0.4 / 0.3 is 4.000000000000001 in floats; the answer is 4, not 5
    assert signals(decode(kv_cache_utilization=0.3), window, 3) == (
        Signal("kvCacheUtilization", 0.4, 0.3, 4),
    )


def test_queue_depth_is_a_total_over_the_per_replica_target() -> None:
    window = MetricsWindow(prefill=PoolMetrics(requests_waiting=9))
    assert signals(prefill(queue_depth_per_replica=2), window, 3) == (
        Signal("queueDepthPerReplica", 9, 2, 5),
    )
    idle = MetricsWindow(prefill=PoolMetrics(requests_waiting=0))
    assert signals(prefill(queue_depth_per_replica=2), idle, 3)[0].replicas == 0


def test_the_most_demanding_signal_wins() -> None:
    window = MetricsWindow(
        decode=PoolMetrics(itl_p90_s=0.1, kv_cache_usage=0.9, requests_waiting=1)
    )
    policy = decode(itl_p90_s=0.05, kv_cache_utilization=0.9, queue_depth_per_replica=4)
    found = signals(policy, window, 4)
    assert [(s.name, s.replicas) for s in found] == [
        ("itlP90Ms", 8),
        ("kvCacheUtilization", 4),
        ("queueDepthPerReplica", 1),
    ]
    assert recommendation(found) == 8


def test_no_data_no_signal() -> None:
    policy = decode(itl_p90_s=0.05, kv_cache_utilization=0.8, queue_depth_per_replica=2)
    assert signals(policy, MetricsWindow(), 3) == ()
    assert recommendation(()) is None


def test_pools_follow_the_traffic_mix_together() -> None:
    policies = {
        Pool.PREFILL: PoolPolicy(Pool.PREFILL, 1, 100, capacity=Capacity(4000.0, None, 0.5)),
        Pool.DECODE: PoolPolicy(Pool.DECODE, 1, 100, capacity=Capacity(500.0, None, 0.5)),
    }

    def sizes(tokens_in: float, tokens_out: float) -> tuple[int | None, int | None]:
        window = MetricsWindow(
            prefill=PoolMetrics(prompt_tokens_per_s=tokens_in),
            decode=PoolMetrics(generation_tokens_per_s=tokens_out),
        )
        decided = plan(policies, window, {Pool.PREFILL: 4, Pool.DECODE: 4}, {}, 0.0)
        return decided[Pool.PREFILL].recommended_replicas, decided[Pool.DECODE].recommended_replicas

    assert sizes(8000, 1000) == (4, 4)  # chat: short prompts, long answers
    assert sizes(16000, 250) == (8, 1)  # same requests, long prompts and short answers
    assert sizes(2000, 3000) == (1, 12)


def test_decode_counts_sequences_queued_for_prefill() -> None:
    window = MetricsWindow(
        prefill=PoolMetrics(requests_waiting=16),
        decode=PoolMetrics(requests_running=40, requests_waiting=8),
    )
    policy = decode(Capacity(sequences_per_replica=32, target_utilization=0.5))
    # (40 + 8 + 16) sequences / (32 * 0.5) per replica
    assert signals(policy, window, 2) == (Signal("sequencesPerReplica", 64, 16, 4),)


def test_history_is_not_needed_for_a_first_decision() -> None:
    decided = plan(
        {Pool.PREFILL: prefill(queue_depth_per_replica=1)},
        MetricsWindow(prefill=PoolMetrics(requests_waiting=3)),
        {Pool.PREFILL: 1},
        {Pool.PREFILL: ScalingHistory()},
        0.0,
    )
    assert decided[Pool.PREFILL].desired_replicas == 3


def test_a_demand_past_the_float_range_asks_for_the_most_replicas() -> None:
    # 1e300 waiting over 1e-10 per replica is +Inf replicas in floats; Kubernetes counts
    # replicas in int32, and min/max clamp it from there
    window = MetricsWindow(prefill=PoolMetrics(requests_waiting=1e300))
    (signal,) = signals(prefill(queue_depth_per_replica=1e-10), window, 3)
    assert signal.replicas == 2**31 - 1
    decided = plan({Pool.PREFILL: prefill(queue_depth_per_replica=1e-10)}, window,
                   {Pool.PREFILL: 3}, {}, 0.0)  # fmt: skip
    assert decided[Pool.PREFILL].desired_replicas == 7  # 3 + 4 pods in the first period
