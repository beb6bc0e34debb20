"""The policy engine: metrics window -> desired replicas per pool, and why.

Pure functions: no clock, no I/O, no Kubernetes. The kopf operator, `baton serve`'s
local autoscaler and the simulator all call `decide` (one pool) or `plan` (both pools
over one window) and keep the returned `ScalingHistory` for the next call; after
resizing the target they record it with `Decision.applied`.

    signals (demand.py)  ->  max  ->  stabilization window  ->  step policies, min/max
       per objective        raw        (ScalingHistory)          (ScalingHistory)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from operators.condition import Condition, ConditionType, ready
from operators.demand import Signal, recommendation, signals
from operators.metrics_window import MetricsWindow
from operators.pool_policy import Pool, PoolPolicy
from operators.scaling_history import ScalingHistory


@dataclass(frozen=True)
class Decision:
    pool: Pool
    current_replicas: int
    desired_replicas: int
    recommended_replicas: int | None  # the raw max over signals; None without data
    signals: tuple[Signal, ...]
    conditions: tuple[Condition, ...]  # Ready, ScalingActive, AbleToScale, ScalingLimited
    history: ScalingHistory  # with this decision's recommendation; pass to the next call
    horizon_seconds: float  # how long the history has to remember

    @property
    def changes(self) -> bool:
        return self.desired_replicas != self.current_replicas

    def applied(self, now: float) -> ScalingHistory:
        """The history after the target was resized to `desired_replicas` at `now`."""
        return self.history.scaled(
            now, self.current_replicas, self.desired_replicas, self.horizon_seconds
        )

    def condition(self, kind: ConditionType) -> Condition:
        return next(c for c in self.conditions if c.type is kind)


def decide(
    policy: PoolPolicy,
    window: MetricsWindow,
    current: int,
    history: ScalingHistory,
    now: float,
) -> Decision:
    """Desired replicas for `policy.pool`, given its `current` size and past decisions."""
    horizon = policy.behavior.longest_window_seconds
    history = history.seeded(now, current)
    found = signals(policy, window, current)
    raw = recommendation(found)
    bounds = (policy.min_replicas, policy.max_replicas)

    if raw is None:
        active = Condition(
            ConditionType.SCALING_ACTIVE,
            False,
            "MissingMetrics",
            f"no metric in the window has data for the {policy.pool} pool's objectives",
        )
        able = Condition(
            ConditionType.ABLE_TO_SCALE, True, "ReadyForNewScale", "keeping the current size"
        )
        stabilized = current
    else:
        history = history.recommended(now, raw, horizon)
        verdict = history.stabilize(policy.behavior, now, current, raw)
        active = Condition(
            ConditionType.SCALING_ACTIVE,
            True,
            "ValidMetricFound",
            "the desired size is computed from " + ", ".join(s.name for s in found),
        )
        able = Condition(ConditionType.ABLE_TO_SCALE, True, verdict.reason, verdict.message)
        stabilized = verdict.replicas

    limit = history.limit(policy.behavior, now, current, stabilized, bounds)
    limited = Condition(
        ConditionType.SCALING_LIMITED, limit.replicas != stabilized, limit.reason, limit.message
    )
    conditions = (active, able, limited)
    return Decision(
        pool=policy.pool,
        current_replicas=current,
        desired_replicas=limit.replicas,
        recommended_replicas=raw,
        signals=found,
        conditions=(ready(conditions), *conditions),
        history=history,
        horizon_seconds=horizon,
    )


def plan(
    policies: Mapping[Pool, PoolPolicy],
    window: MetricsWindow,
    current: Mapping[Pool, int],
    histories: Mapping[Pool, ScalingHistory],
    now: float,
) -> dict[Pool, Decision]:
    """Both pools over one window: their sizes share the window's traffic mix."""
    return {
        pool: decide(policy, window, current[pool], histories.get(pool, ScalingHistory()), now)
        for pool, policy in policies.items()
    }
