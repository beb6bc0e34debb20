"""The policy engine's input: what both pools did over one metrics window.

A source (Prometheus query, direct scrape, the local autoscaler's own scrape, the
simulator) reduces DESIGN.md's telemetry to these numbers. `None` means "no data in
the window" (no request finished, or no previous scrape to take a rate or percentile
from); the engine skips a signal without data rather than reading it as zero. A sample
that is no measurement (`measurement`: not finite, or negative) is no data either, in
every source. One exception, `PoolMetrics.idle`: a latency percentile without data in a
pool with nothing waiting or running is no demand, not missing data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from operators.pool_policy import Pool


def finite(value: float) -> float | None:
    """`value`, or None for NaN and ±Inf: a gauge set from 0/0, Prometheus' answer for an
    empty ratio, a broken exporter. A pool with only such samples has missing metrics."""
    return value if math.isfinite(value) else None


def measurement(value: float) -> float | None:
    """`value`, or None where it cannot be a measurement: not `finite`, or below zero.

    Every number a source reads is a latency, a count, a ratio or a rate, so a negative
    one is a broken exporter (a gauge decremented once too often, a counter set from a
    difference). Read as is, it would ask for negative replicas: the pool would shrink
    to minReplicas on telemetry that says nothing, and the status would show it.
    """
    return value if math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True)
class PoolMetrics:
    """One pool, summed or averaged over its replicas. Latencies in seconds."""

    # baton_time_to_first_token_seconds: the router's, arrival to the first token leaving
    # decode, so the decode KV pull is inside it already
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None  # baton_inter_token_latency_seconds
    kv_transfer_p90_s: float | None = None  # baton_kv_transfer_seconds
    requests_waiting: float | None = None  # baton_num_requests_waiting, summed
    requests_running: float | None = None  # baton_num_requests_running, summed
    kv_cache_usage: float | None = None  # baton_kv_cache_usage_ratio, mean over replicas
    request_rate: float | None = None  # requests/s: rate of the TTFT histogram's count
    prompt_tokens_per_s: float | None = None  # rate(baton_prompt_tokens_total)
    generation_tokens_per_s: float | None = None  # rate(baton_generation_tokens_total)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running, both gauges read: a latency objective is
        met (no request is slow), so a percentile without data here is no demand. When a
        gauge is missing, so is the data."""
        return self.requests_waiting == 0 and self.requests_running == 0


@dataclass(frozen=True)
class MetricsWindow:
    """Both pools over the same window, so the two decisions share one traffic mix."""

    prefill: PoolMetrics = field(default_factory=PoolMetrics)
    decode: PoolMetrics = field(default_factory=PoolMetrics)

    def of(self, pool: Pool) -> PoolMetrics:
        return self.prefill if pool is Pool.PREFILL else self.decode

    @property
    def input_tokens_per_s(self) -> float | None:
        """Prompt tokens the service takes in: prefill workers count them."""
        return self.prefill.prompt_tokens_per_s

    @property
    def output_tokens_per_s(self) -> float | None:
        """Tokens the service streams out: decode workers count them."""
        return self.decode.generation_tokens_per_s
