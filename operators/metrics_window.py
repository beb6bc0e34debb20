"""The policy engine's input: what both pools did over one metrics window.

A source (Prometheus query, direct scrape, the local autoscaler's own scrape, the
simulator) reduces DESIGN.md's telemetry to these numbers. `None` means "no data in
the window" (no request finished, or no previous scrape to take a rate from); the
engine skips a signal without data rather than reading it as zero. A sample that is
no measurement (`measurement`: not finite, or negative) is no data either, in every
source.
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

    ttft_p90_s: float | None = None  # baton_time_to_first_token_seconds
    itl_p90_s: float | None = None  # baton_inter_token_latency_seconds
    kv_transfer_p90_s: float | None = None  # baton_kv_transfer_seconds
    requests_waiting: float | None = None  # baton_num_requests_waiting, summed
    requests_running: float | None = None  # baton_num_requests_running, summed
    kv_cache_usage: float | None = None  # baton_kv_cache_usage_ratio, mean over replicas
    request_rate: float | None = None  # requests/s: rate of the TTFT histogram's count
    prompt_tokens_per_s: float | None = None  # rate(baton_prompt_tokens_total)
    generation_tokens_per_s: float | None = None  # rate(baton_generation_tokens_total)


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

    @property
    def effective_ttft_p90_s(self) -> float | None:
        """TTFT as the prefill objective sees it: the decode side's KV pull is part of it.

        The first token is useless to a client until decode holds the prompt's KV, so
        a slow transfer eats the same budget as a slow prefill. (p90s do not add
        exactly; the sum is a conservative bound, which is the safe side to scale on.)
        """
        if self.prefill.ttft_p90_s is None:
            return None
        return self.prefill.ttft_p90_s + (self.decode.kv_transfer_p90_s or 0.0)
