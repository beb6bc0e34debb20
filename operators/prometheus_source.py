"""PrometheusSource: the metrics window as PromQL instant queries over the HTTP API.

Percentiles are `histogram_quantile(0.9, sum by (le) (rate(..._bucket[w])))`, rates
`sum(rate(...[w]))`, queue and running gauges summed, KV cache use averaged, all over
the series of one pool (`pool="prefill"|"decode"`), the policy's model and any extra
label matchers (`selector`, e.g. `namespace="llm"`). An empty answer (no series, or no
requests in the window) is None, as for the scrape source.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields

import aiohttp

from operators.exposition import (
    GENERATION_TOKENS,
    ITL,
    KV_TRANSFER,
    KV_USAGE,
    PROMPT_TOKENS,
    RUNNING,
    TTFT,
    WAITING,
)
from operators.metrics_source import MetricsUnavailable
from operators.metrics_window import MetricsWindow, PoolMetrics, measurement
from operators.pool_policy import Pool

# PoolMetrics field -> PromQL template; {m} is the metric, {s} the series selector, {w} range
_QUERIES = {
    "ttft_p90_s": (TTFT, "histogram_quantile(0.9, sum by (le) (rate({m}_bucket{s}[{w}])))"),
    "itl_p90_s": (ITL, "histogram_quantile(0.9, sum by (le) (rate({m}_bucket{s}[{w}])))"),
    "kv_transfer_p90_s": (
        KV_TRANSFER,
        "histogram_quantile(0.9, sum by (le) (rate({m}_bucket{s}[{w}])))",
    ),
    "requests_waiting": (WAITING, "sum({m}{s})"),
    "requests_running": (RUNNING, "sum({m}{s})"),
    "kv_cache_usage": (KV_USAGE, "avg({m}{s})"),
    "request_rate": (TTFT, "sum(rate({m}_count{s}[{w}]))"),
    "prompt_tokens_per_s": (PROMPT_TOKENS, "sum(rate({m}{s}[{w}]))"),
    "generation_tokens_per_s": (GENERATION_TOKENS, "sum(rate({m}{s}[{w}]))"),
}
assert set(_QUERIES) == {f.name for f in fields(PoolMetrics)}


class PrometheusSource:
    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        model: str | None = None,
        metric_prefix: str = "baton_",
        selector: str = "",
        rate_window: str = "1m",
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/") + "/api/v1/query"
        self._session = session
        self._model, self._prefix, self._selector = model, metric_prefix, selector
        self._window = rate_window
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def queries(self, pool: Pool) -> dict[str, str]:
        """The PromQL behind each PoolMetrics field of `pool`."""
        matchers = [f'pool="{pool}"']
        if self._model is not None:
            matchers.append(f'model="{self._model}"')
        if self._selector:
            matchers.append(self._selector)
        series = "{" + ",".join(matchers) + "}"
        return {
            name: template.format(m=self._prefix + metric, s=series, w=self._window)
            for name, (metric, template) in _QUERIES.items()
        }

    async def window(self) -> MetricsWindow:
        pools = {}
        for pool in Pool:
            queries = self.queries(pool)
            values = await asyncio.gather(*(self._query(q) for q in queries.values()))
            pools[pool] = PoolMetrics(**dict(zip(queries, values, strict=True)))
        return MetricsWindow(prefill=pools[Pool.PREFILL], decode=pools[Pool.DECODE])

    async def _query(self, expr: str) -> float | None:
        try:
            async with self._session.get(
                self.url, params={"query": expr}, timeout=self._timeout
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise MetricsUnavailable(f"Prometheus at {self.url}: {e!r}") from e
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise MetricsUnavailable(f"Prometheus rejected {expr!r}: {error}")
        result = body["data"]["result"]
        if not result:
            return None
        return measurement(float(result[0]["value"][1]))
