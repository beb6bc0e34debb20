"""HPA behavior in the engine: exact replica sequences under stabilization windows,
step policies and bounds, plus the conditions that say why."""

from __future__ import annotations

from collections.abc import Sequence

from operators.autoscaler import Autoscaler
from operators.condition import ConditionType
from operators.demand import Signal
from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.policy_engine import Decision, decide
from operators.pool_policy import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    Behavior,
    Objectives,
    PolicyType,
    Pool,
    PoolPolicy,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
)
from operators.scaling_history import ScalingHistory


def queue_policy(behavior: Behavior | None = None, low: int = 1, high: int = 100) -> PoolPolicy:
    """Asks for exactly `waiting` replicas (one waiting request per replica)."""
    return PoolPolicy(
        Pool.DECODE,
        low,
        high,
        Objectives(queue_depth_per_replica=1),
        behavior=behavior or Behavior(),
    )


def waiting(n: float) -> MetricsWindow:
    return MetricsWindow(decode=PoolMetrics(requests_waiting=n))


def replay(
    policy: PoolPolicy, start: int, loads: Sequence[float], every_s: float
) -> tuple[list[int], list[Decision]]:
    """Drive the engine like a controller: decide, resize at once, decide again."""
    autoscaler, current = Autoscaler({policy.pool: policy}), start
    sizes, decisions = [], []
    for i, load in enumerate(loads):
        now = i * every_s
        decision = autoscaler.step(waiting(load), {policy.pool: current}, now)[policy.pool]
        if decision.changes:
            autoscaler.applied(decision, now)
        current = decision.desired_replicas
        sizes.append(current)
        decisions.append(decision)
    return sizes, decisions


def why(decision: Decision, kind: ConditionType) -> tuple[bool, str]:
    c = decision.condition(kind)
    return c.status, c.reason


def test_scale_up_waits_for_the_up_window_then_steps() -> None:
    behavior = Behavior(scale_up=ScalingRules(60, DEFAULT_SCALE_UP.policies))
    sizes, decisions = replay(queue_policy(behavior), 2, [2, 8, 8, 8, 8, 8], every_s=15)
    # t=0..45: the 2 recommended at t=0 is inside the 60 s window; t=60: it left the
    # window (strictly older), but one step is at most max(+100%, +4) = 6; t=75: the
    # t=60 resize is exactly 15 s old, out of the period, so 8 is allowed
    assert sizes == [2, 2, 2, 2, 6, 8]
    assert why(decisions[1], ConditionType.ABLE_TO_SCALE) == (True, "ScaleUpStabilized")
    assert why(decisions[4], ConditionType.SCALING_LIMITED) == (True, "ScaleUpLimit")
    assert why(decisions[5], ConditionType.SCALING_LIMITED) == (False, "DesiredWithinRange")


def test_scale_down_waits_for_the_default_300s_window() -> None:
    sizes, decisions = replay(queue_policy(), 10, [10, 2, 2, 2, 2, 2, 2], every_s=60)
    assert sizes == [10, 10, 10, 10, 10, 2, 2]
    assert why(decisions[1], ConditionType.ABLE_TO_SCALE) == (True, "ScaleDownStabilized")
    assert why(decisions[5], ConditionType.ABLE_TO_SCALE) == (True, "ReadyForNewScale")


def test_a_fresh_policy_does_not_scale_down_before_a_window_passed() -> None:
    # no history (new policy, restarted operator): the current size seeds the window
    decision = decide(queue_policy(), waiting(1), 10, ScalingHistory(), now=1000.0)
    assert decision.desired_replicas == 10
    assert why(decision, ConditionType.ABLE_TO_SCALE) == (True, "ScaleDownStabilized")


def test_pods_policy_paces_scale_down_per_period() -> None:
    one_a_minute = ScalingRules(0, (ScalingPolicy(PolicyType.PODS, 1, 60),))
    sizes, decisions = replay(
        queue_policy(Behavior(scale_down=one_a_minute), low=2), 5, [1] * 8, every_s=30
    )
    assert sizes == [4, 4, 3, 3, 2, 2, 2, 2]
    assert why(decisions[1], ConditionType.SCALING_LIMITED) == (True, "ScaleDownLimit")
    assert why(decisions[7], ConditionType.SCALING_LIMITED) == (True, "TooFewReplicas")


def test_select_policy_min_takes_the_smaller_step_and_percent_rounds_exactly() -> None:
    rules = (ScalingPolicy(PolicyType.PERCENT, 50, 60), ScalingPolicy(PolicyType.PODS, 4, 60))
    for select, expected in [(SelectPolicy.MAX, 15), (SelectPolicy.MIN, 14)]:
        behavior = Behavior(scale_up=ScalingRules(0, rules, select))
        assert replay(queue_policy(behavior), 10, [40], 15)[0] == [expected]
    ten_percent = Behavior(scale_up=ScalingRules(0, (ScalingPolicy(PolicyType.PERCENT, 10, 60),)))
    assert replay(queue_policy(ten_percent), 10, [40], 15)[0] == [11]  # float math says 12


def test_disabled_direction_never_moves() -> None:
    frozen = Behavior(scale_down=ScalingRules(0, (), SelectPolicy.DISABLED))
    sizes, decisions = replay(queue_policy(frozen), 6, [1, 1, 9], every_s=15)
    assert sizes == [6, 6, 9]
    assert why(decisions[0], ConditionType.SCALING_LIMITED) == (True, "ScaleDownLimit")


def test_bounds_cap_the_recommendation_and_pull_a_resized_target_back() -> None:
    sizes, decisions = replay(queue_policy(high=10), 8, [50], every_s=15)
    assert sizes == [10]
    assert why(decisions[0], ConditionType.SCALING_LIMITED) == (True, "TooManyReplicas")
    # someone scaled the target to 14 by hand; it comes back to max at once
    decision = decide(queue_policy(high=10), waiting(14), 14, ScalingHistory(), 0.0)
    assert decision.desired_replicas == 10
    assert why(decision, ConditionType.SCALING_LIMITED) == (True, "TooManyReplicas")


def test_missing_metrics_keep_the_size_and_say_so() -> None:
    decision = decide(queue_policy(), MetricsWindow(), 3, ScalingHistory(), 0.0)
    assert decision.desired_replicas == 3
    assert decision.recommended_replicas is None
    assert why(decision, ConditionType.SCALING_ACTIVE) == (False, "MissingMetrics")
    assert why(decision, ConditionType.READY) == (False, "MissingMetrics")


def test_an_idle_pool_meets_its_latency_objective_and_shrinks() -> None:
    """No request finished and nothing waiting or running is no demand, not missing data:
    a TTFT-only prefill policy comes down after a burst (the reviewer's pool stayed at 8)."""
    policy = PoolPolicy(Pool.PREFILL, 1, 8, Objectives(ttft_p90_s=0.5))
    burst = MetricsWindow(
        prefill=PoolMetrics(ttft_p90_s=2.0, requests_waiting=12, requests_running=4)
    )
    idle = MetricsWindow(prefill=PoolMetrics(requests_waiting=0, requests_running=0))
    autoscaler, current, sizes = Autoscaler({Pool.PREFILL: policy}), 4, []
    for i, window in enumerate([burst] + [idle] * 6):
        decision = autoscaler.step(window, {Pool.PREFILL: current}, i * 60.0)[Pool.PREFILL]
        if decision.changes:
            autoscaler.applied(decision, i * 60.0)
        current = decision.desired_replicas
        sizes.append(current)
    # 2.0 / 0.5 asks for 16 (max 8); idle asks for none once the t=0 recommendation left
    # the 300 s down-window
    assert sizes == [8, 8, 8, 8, 8, 1, 1]
    assert decision.signals == (Signal("ttftP90Ms", 0.0, 500.0, 0),)
    assert decision.recommended_replicas == 0
    assert why(decision, ConditionType.SCALING_ACTIVE) == (True, "ValidMetricFound")
    assert why(decision, ConditionType.SCALING_LIMITED) == (True, "TooFewReplicas")
    assert why(decision, ConditionType.READY) == (True, "Reconciled")


def test_other_signals_decide_for_an_idle_pools_latency() -> None:
    policy = PoolPolicy(Pool.DECODE, 1, 8, Objectives(itl_p90_s=0.05, kv_cache_utilization=0.5))
    idle = MetricsWindow(
        decode=PoolMetrics(requests_waiting=0, requests_running=0, kv_cache_usage=0.75)
    )
    decision = decide(policy, idle, 4, ScalingHistory(), 0.0)
    assert decision.signals == (
        Signal("itlP90Ms", 0.0, 50.0, 0),
        Signal("kvCacheUtilization", 0.75, 0.5, 6),  # blocks still cached: the max wins
    )
    assert decision.desired_replicas == 6


def test_latency_without_data_in_a_busy_or_unobserved_pool_is_missing() -> None:
    policy = PoolPolicy(Pool.PREFILL, 1, 8, Objectives(ttft_p90_s=0.5))
    for metrics in (
        PoolMetrics(),  # no gauges at all
        PoolMetrics(requests_waiting=0),  # running not exported
        PoolMetrics(requests_waiting=0, requests_running=3),  # long prefills, none done yet
        PoolMetrics(requests_waiting=2, requests_running=0),
    ):
        decision = decide(policy, MetricsWindow(prefill=metrics), 5, ScalingHistory(), 0.0)
        assert decision.signals == (), metrics
        assert decision.desired_replicas == 5
        assert why(decision, ConditionType.SCALING_ACTIVE) == (False, "MissingMetrics")


def test_history_forgets_what_no_window_can_see() -> None:
    horizon = Behavior(DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN).longest_window_seconds
    assert horizon == 300
    history = ScalingHistory()
    for t in range(0, 1000, 100):
        history = history.recommended(float(t), t, horizon).scaled(float(t), t, t + 1, horizon)
    # at t=900 only entries newer than 900 - 300 are kept
    assert history.recommendations == ((700.0, 700), (800.0, 800), (900.0, 900))
    assert history.scale_events == ((700.0, 1), (800.0, 1), (900.0, 1))
