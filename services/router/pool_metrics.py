"""Prometheus text for GET /metrics: the pools' counters as the router last read them.

Names and labels are DESIGN.md's ("Telemetry"); the `vllm:` gauges let a Gateway API
Inference Extension endpoint picker read Baton's pools.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from services.pool_requests import PoolStats


def render_pool_metrics(
    model: str, pools: dict[str, list[PoolStats]], local_prefills: Counter[str]
) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {value:g}" for labels, value in samples)

    def per_pool(field: str) -> list[tuple[str, float]]:
        return [
            (f'pool="{pool}",model="{model}"', float(sum(getattr(s, field) for s in stats)))
            for pool, stats in pools.items()
        ]

    def usage(stats: list[PoolStats]) -> float:
        total = sum(s.total_blocks for s in stats)
        return 1.0 - sum(s.free_blocks for s in stats) / total if total else 0.0

    metric(
        "baton_num_requests_running", "gauge", "Requests in a running batch.", per_pool("running")
    )
    metric(
        "baton_num_requests_waiting", "gauge", "Requests queued for a batch.", per_pool("waiting")
    )
    metric(
        "baton_kv_cache_usage_ratio",
        "gauge",
        "Fraction of paged KV blocks in use.",
        [(f'pool="{p}",model="{model}"', usage(s)) for p, s in pools.items()],
    )
    metric(
        "baton_prompt_tokens_total", "counter", "Prompt tokens admitted.", per_pool("prompt_tokens")
    )
    metric(
        "baton_prefix_cache_queried_tokens_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        per_pool("prompt_tokens"),
    )
    metric(
        "baton_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens found in the prefix cache.",
        per_pool("cached_prompt_tokens"),
    )
    metric(
        "baton_generation_tokens_total",
        "counter",
        "Tokens generated.",
        per_pool("generated_tokens"),
    )
    metric(
        "baton_kv_transfer_bytes_total",
        "counter",
        "KV bytes moved to or from the store.",
        [
            (
                f'pool="{p}",model="{model}",direction="{d}"',
                float(sum(s.kv_transfer_bytes.get(d, 0) for s in stats)),
            )
            for p, stats in pools.items()
            for d in ("get", "put")
        ],
    )
    reasons = Counter(local_prefills)
    for stats in pools.values():
        for s in stats:
            reasons.update(s.fallbacks)
    metric(
        "baton_local_prefill_fallback_total",
        "counter",
        "Requests decode prefilled itself, by reason.",
        [
            (f'pool="decode",model="{model}",reason="{r}"', float(n))
            for r, n in sorted(reasons.items())
        ],
    )
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Requests waiting (endpoint picker).",
        per_pool("waiting"),
    )
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV cache usage, 0-1 (endpoint picker).",
        [(f'pool="{p}",model="{model}"', usage(s)) for p, s in pools.items()],
    )
    return "\n".join(lines) + "\n"
