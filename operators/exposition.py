"""Exposition: one `/metrics` page (Prometheus text format) reduced to what the engine reads.

Metric names are DESIGN.md "Telemetry"'s, less the `baton_` prefix; series carry the
labels `pool` (only `prefill` and `decode` matter here) and `model`. Series of one
pool are merged: histograms bucket by bucket, counters summed, gauges kept per series
(waiting/running are summed later, KV cache use averaged). Samples that are no
measurement (not finite, or negative) are left out, as `metrics_window.measurement` has
every source do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from operators.histogram import Histogram
from operators.metrics_window import measurement
from operators.pool_policy import Pool

TTFT = "time_to_first_token_seconds"
ITL = "inter_token_latency_seconds"
KV_TRANSFER = "kv_transfer_seconds"
WAITING = "num_requests_waiting"
RUNNING = "num_requests_running"
KV_USAGE = "kv_cache_usage_ratio"
PROMPT_TOKENS = "prompt_tokens_total"
GENERATION_TOKENS = "generation_tokens_total"
HISTOGRAMS = (TTFT, ITL, KV_TRANSFER)
GAUGES = (WAITING, RUNNING, KV_USAGE)
COUNTERS = (PROMPT_TOKENS, GENERATION_TOKENS)


@dataclass(frozen=True)
class PoolSeries:
    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)
    gauges: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Exposition:
    pools: Mapping[Pool, PoolSeries]

    def of(self, pool: Pool) -> PoolSeries:
        return self.pools.get(pool, PoolSeries())

    @classmethod
    def parse(cls, text: str, model: str | None = None, prefix: str = "baton_") -> Exposition:
        """Keep the engine's series for `model` (all models when None); raise ValueError
        on text that is not Prometheus exposition format."""
        buckets: dict[tuple[Pool, str], dict[float, float]] = {}
        counters: dict[tuple[Pool, str], float] = {}
        gauges: dict[tuple[Pool, str], list[float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                pool_label = sample.labels.get("pool")
                if pool_label not in (Pool.PREFILL, Pool.DECODE):
                    continue
                if model is not None and sample.labels.get("model") != model:
                    continue
                value = measurement(sample.value)
                if not sample.name.startswith(prefix) or value is None:
                    continue
                name, pool = sample.name[len(prefix) :], Pool(pool_label)
                if name.endswith("_bucket") and name[: -len("_bucket")] in HISTOGRAMS:
                    series = buckets.setdefault((pool, name[: -len("_bucket")]), {})
                    le = float(sample.labels["le"])
                    series[le] = series.get(le, 0.0) + value
                elif name in COUNTERS:
                    counters[pool, name] = counters.get((pool, name), 0.0) + value
                elif name in GAUGES:
                    gauges.setdefault((pool, name), []).append(value)
        return cls(
            {
                pool: PoolSeries(
                    {
                        n: Histogram(tuple(sorted(b.items())))
                        for (p, n), b in buckets.items()
                        if p is pool
                    },
                    {n: v for (p, n), v in counters.items() if p is pool},
                    {n: tuple(v) for (p, n), v in gauges.items() if p is pool},
                )
                for pool in Pool
            }
        )
