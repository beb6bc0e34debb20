"""Demand: how many replicas each objective asks for, before behavior smooths it.

Every objective or capacity hint a policy sets is one `Signal`; the pool's raw
recommendation is the largest (HPA takes the max over metrics, so no objective is
given up to satisfy another). Two kinds of signal:

* ratio signals (TTFT, ITL, KV cache use): the observed value per replica over the
  target scales the current replica count, `ceil(current * observed / target)`;
* total signals (queue depth, traffic, concurrency): a pool-wide total over the
  per-replica target, `ceil(total / per_replica)`.

Both leave the pool alone inside HPA's tolerance band (|ratio - 1| <= tolerance). A
latency objective of an idle pool (no request in the window, nothing waiting or running)
is met: it reads 0 and asks for no replicas, rather than holding the pool at its size.

Prefill and decode read one `MetricsWindow`, so their sizes follow the traffic mix:
prefill's traffic signal is input tokens/s over a replica's prompt-token rate, decode's
is output tokens/s over a replica's generation rate; and requests waiting for prefill
count as decode sequences about to arrive. (The decode KV pull counts toward TTFT by
measurement: the router's TTFT ends when the first token leaves decode.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.pool_policy import Pool, PoolPolicy

_EPS = 1e-9  # keeps ceil(3 * (4 / 3)) at 4 despite float rounding
_MOST_REPLICAS = 2**31 - 1  # Kubernetes counts replicas in int32


@dataclass(frozen=True)
class Signal:
    """One objective's verdict. `observed`/`target` in the CRD field's units (ms for latency)."""

    name: str
    observed: float
    target: float
    replicas: int


def _ceil(x: float) -> int:
    """Replicas for a demand of `x`; finite inputs can still overflow to +Inf (1e300 / 1e-10)."""
    return _MOST_REPLICAS if x >= _MOST_REPLICAS else math.ceil(x - _EPS)


def _ratio_signal(
    name: str, observed: float, target: float, current: int, tolerance: float
) -> Signal:
    base = max(current, 1)
    ratio = observed / target
    replicas = current if abs(ratio - 1) <= tolerance else _ceil(base * ratio)
    return Signal(name, observed, target, replicas)


def _total_signal(
    name: str, total: float, per_replica: float, current: int, tolerance: float
) -> Signal:
    ratio = total / (per_replica * max(current, 1))
    replicas = current if abs(ratio - 1) <= tolerance else _ceil(total / per_replica)
    return Signal(name, total, per_replica, replicas)


def signals(policy: PoolPolicy, window: MetricsWindow, current: int) -> tuple[Signal, ...]:
    """Every signal of `policy` that has data in `window`, in a fixed order."""
    objectives, capacity, tol = policy.objectives, policy.capacity, policy.tolerance
    metrics = window.of(policy.pool)
    out: list[Signal] = []

    ttft = _latency(metrics.ttft_p90_s, metrics)
    if policy.pool is Pool.PREFILL and objectives.ttft_p90_s and ttft is not None:
        out.append(
            _ratio_signal("ttftP90Ms", ttft * 1e3, objectives.ttft_p90_s * 1e3, current, tol)
        )
    itl = _latency(metrics.itl_p90_s, metrics)
    if policy.pool is Pool.DECODE and objectives.itl_p90_s and itl is not None:
        out.append(_ratio_signal("itlP90Ms", itl * 1e3, objectives.itl_p90_s * 1e3, current, tol))
    if objectives.kv_cache_utilization and metrics.kv_cache_usage is not None:
        out.append(
            _ratio_signal(
                "kvCacheUtilization",
                metrics.kv_cache_usage,
                objectives.kv_cache_utilization,
                current,
                tol,
            )
        )
    if objectives.queue_depth_per_replica and metrics.requests_waiting is not None:
        out.append(
            _total_signal(
                "queueDepthPerReplica",
                metrics.requests_waiting,
                objectives.queue_depth_per_replica,
                current,
                tol,
            )
        )

    tokens = (
        window.input_tokens_per_s if policy.pool is Pool.PREFILL else window.output_tokens_per_s
    )
    per_replica_tokens = capacity.tokens_per_second_per_replica
    if per_replica_tokens and tokens is not None:
        out.append(
            _total_signal(
                "tokensPerSecondPerReplica",
                tokens,
                per_replica_tokens * capacity.target_utilization,
                current,
                tol,
            )
        )

    if policy.pool is Pool.DECODE and capacity.sequences_per_replica:
        sequences = _decode_sequences(window)
        if sequences is not None:
            out.append(
                _total_signal(
                    "sequencesPerReplica",
                    sequences,
                    capacity.sequences_per_replica * capacity.target_utilization,
                    current,
                    tol,
                )
            )
    return tuple(out)


def _latency(p90: float | None, metrics: PoolMetrics) -> float | None:
    """A latency p90 to hold against its objective. Without requests in the window an idle
    pool reads 0 (the signal asks for no replicas, so the other signals and minReplicas
    decide, as for an empty queue); a busy or unobserved one has no data, and keeps its
    size as an HPA does when metrics are missing."""
    if p90 is None and metrics.idle:
        return 0.0
    return p90


def _decode_sequences(window: MetricsWindow) -> float | None:
    """Sequences decode holds now or soon: its own, plus those queued for prefill."""
    parts = (
        window.decode.requests_running,
        window.decode.requests_waiting,
        window.prefill.requests_waiting,
    )
    if all(p is None for p in parts):
        return None
    return sum(p or 0.0 for p in parts)


def recommendation(found: tuple[Signal, ...]) -> int | None:
    """The raw replica count: the most demanding signal, or None without data."""
    return max((s.replicas for s in found), default=None)
