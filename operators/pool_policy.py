"""What one CapacityPolicy asks of its pool, as the policy engine sees it.

Frozen dataclasses validated on construction; user input reaches them only through
`operators.policy_spec` (pydantic), so a violation here is a programming error.
The defaults are the HorizontalPodAutoscaler's, so a policy reads like an HPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Pool(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


class PolicyType(StrEnum):
    PODS = "Pods"
    PERCENT = "Percent"


class SelectPolicy(StrEnum):
    MAX = "Max"  # the policy allowing the biggest change wins
    MIN = "Min"  # the policy allowing the smallest change wins
    DISABLED = "Disabled"  # no scaling in this direction


@dataclass(frozen=True)
class ScalingPolicy:
    """At most `value` pods (or percent of the replicas at the period's start) per period."""

    type: PolicyType
    value: int
    period_seconds: int

    def __post_init__(self) -> None:
        assert self.value >= 1, self
        assert 1 <= self.period_seconds <= 1800, self


@dataclass(frozen=True)
class ScalingRules:
    """One direction of HPA `behavior`."""

    stabilization_window_seconds: int
    policies: tuple[ScalingPolicy, ...]
    select_policy: SelectPolicy = SelectPolicy.MAX

    def __post_init__(self) -> None:
        assert 0 <= self.stabilization_window_seconds <= 3600, self
        assert self.policies or self.select_policy is SelectPolicy.DISABLED, self


DEFAULT_SCALE_UP = ScalingRules(
    stabilization_window_seconds=0,
    policies=(
        ScalingPolicy(PolicyType.PERCENT, 100, 15),
        ScalingPolicy(PolicyType.PODS, 4, 15),
    ),
)
DEFAULT_SCALE_DOWN = ScalingRules(
    stabilization_window_seconds=300,
    policies=(ScalingPolicy(PolicyType.PERCENT, 100, 15),),
)


@dataclass(frozen=True)
class Behavior:
    scale_up: ScalingRules = DEFAULT_SCALE_UP
    scale_down: ScalingRules = DEFAULT_SCALE_DOWN

    @property
    def longest_window_seconds(self) -> int:
        """How far back any decision looks: recommendations and scale events older are dropped."""
        periods = [p.period_seconds for p in self.scale_up.policies + self.scale_down.policies]
        return max(
            self.scale_up.stabilization_window_seconds,
            self.scale_down.stabilization_window_seconds,
            *periods,
        )


@dataclass(frozen=True)
class Objectives:
    """SLO targets; each one set becomes a signal. Latencies in seconds."""

    ttft_p90_s: float | None = None  # prefill; measured with the decode KV pull in it
    itl_p90_s: float | None = None  # decode
    kv_cache_utilization: float | None = None  # decode, mean over replicas, (0, 1]
    queue_depth_per_replica: float | None = None  # waiting requests per replica

    def __post_init__(self) -> None:
        for value in (self.ttft_p90_s, self.itl_p90_s, self.queue_depth_per_replica):
            assert value is None or value > 0, self
        assert self.kv_cache_utilization is None or 0 < self.kv_cache_utilization <= 1, self


@dataclass(frozen=True)
class Capacity:
    """Per-replica capacity hints: they turn the traffic mix into replicas (feed-forward).

    For a prefill pool `tokens_per_second_per_replica` counts prompt tokens, for a decode
    pool generated tokens; `sequences_per_replica` (decode) bounds concurrent sequences.
    """

    tokens_per_second_per_replica: float | None = None
    sequences_per_replica: int | None = None
    target_utilization: float = 0.8

    def __post_init__(self) -> None:
        assert self.tokens_per_second_per_replica is None or self.tokens_per_second_per_replica > 0
        assert self.sequences_per_replica is None or self.sequences_per_replica >= 1
        assert 0 < self.target_utilization <= 1, self


@dataclass(frozen=True)
class PoolPolicy:
    """Everything the engine needs to size one pool."""

    pool: Pool
    min_replicas: int
    max_replicas: int
    objectives: Objectives = field(default_factory=Objectives)
    capacity: Capacity = field(default_factory=Capacity)
    behavior: Behavior = field(default_factory=Behavior)
    tolerance: float = 0.1  # HPA's: ratios within 1 ± tolerance leave the pool alone

    def __post_init__(self) -> None:
        assert 1 <= self.min_replicas <= self.max_replicas, self
        assert 0 <= self.tolerance < 1, self
