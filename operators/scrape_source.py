"""ScrapeSource: metrics read straight from the pools' `/metrics` pages, no Prometheus.

Counters and histograms are cumulative, so a window is the difference between this
read and the previous one of the same endpoint: rates divide by the time between the
two reads; percentiles come from the histogram's difference. The first read of an
endpoint has no previous one, so it adds nothing to the window's percentiles and its
rates are unknown (None): its histograms hold everything since the process started
(an incident hours ago would read as today's p90 after every operator restart or
`metrics` edit). A series first seen on a later read is new since the previous one and
counts in full. A replica that does not answer is left out of the window; when none
answers, `MetricsUnavailable`. Gauges are instant values, read on every pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

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
    Exposition,
    PoolSeries,
)
from operators.histogram import Histogram
from operators.metrics_source import MetricsUnavailable
from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.pool_policy import Pool

_Read = tuple[float, PoolSeries]  # (time, series) of one endpoint
_Page = tuple[float, Exposition]


class ScrapeSource:
    def __init__(
        self,
        endpoints: Sequence[str],
        session: aiohttp.ClientSession,
        model: str | None = None,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert endpoints, "a scrape source needs at least one endpoint"
        self.endpoints = tuple(endpoints)
        self._session, self._model, self._clock = session, model, clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._previous: dict[str, _Page] = {}

    async def window(self) -> MetricsWindow:
        pages = await asyncio.gather(*(self._read(url) for url in self.endpoints))
        now = self._clock()
        read = {url: page for url, page in zip(self.endpoints, pages, strict=True) if page}
        if not read:
            raise MetricsUnavailable(f"no /metrics endpoint answered: {', '.join(self.endpoints)}")
        pairs = [(self._previous.get(url), (now, page)) for url, page in read.items()]
        self._previous.update({url: (now, page) for url, page in read.items()})
        return MetricsWindow(
            prefill=_pool_metrics(_of(Pool.PREFILL, pairs)),
            decode=_pool_metrics(_of(Pool.DECODE, pairs)),
        )

    async def _read(self, url: str) -> Exposition | None:
        try:
            async with self._session.get(url, timeout=self._timeout) as resp:
                resp.raise_for_status()
                return Exposition.parse(await resp.text(), self._model)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None  # a replica restarting or gone; the others still make a window


def _of(pool: Pool, pairs: list[tuple[_Page | None, _Page]]) -> list[tuple[_Read | None, _Read]]:
    """(previous, current) reads of every endpoint, narrowed to one pool."""
    return [
        (None if before is None else (before[0], before[1].of(pool)), (now, page.of(pool)))
        for before, (now, page) in pairs
    ]


def _pool_metrics(pairs: list[tuple[_Read | None, _Read]]) -> PoolMetrics:
    hists: dict[str, Histogram] = {}
    rates: dict[str, float] = {}
    gauges: dict[str, list[float]] = {}
    for previous, (now, series) in pairs:
        if previous:  # a first read holds the process's whole history: no window of it
            for name, hist in series.histograms.items():
                before = previous[1].histograms.get(name)
                delta = hist.since(before) if before else hist
                hists[name] = hists[name] + delta if name in hists else delta
        if previous and now > previous[0]:
            for name, value in series.counters.items():
                before_value = previous[1].counters.get(name, 0.0)
                increase = value - before_value if value >= before_value else value  # reset
                rates[name] = rates.get(name, 0.0) + increase / (now - previous[0])
        for name, values in series.gauges.items():
            gauges.setdefault(name, []).extend(values)
    interval = _interval(pairs)
    ttft = hists.get(TTFT)
    return PoolMetrics(
        ttft_p90_s=ttft.quantile(0.9) if ttft else None,
        itl_p90_s=hists[ITL].quantile(0.9) if ITL in hists else None,
        kv_transfer_p90_s=hists[KV_TRANSFER].quantile(0.9) if KV_TRANSFER in hists else None,
        requests_waiting=sum(gauges[WAITING]) if WAITING in gauges else None,
        requests_running=sum(gauges[RUNNING]) if RUNNING in gauges else None,
        kv_cache_usage=sum(gauges[KV_USAGE]) / len(gauges[KV_USAGE])
        if KV_USAGE in gauges
        else None,
        request_rate=ttft.count / interval if ttft and interval else None,
        prompt_tokens_per_s=rates.get(PROMPT_TOKENS),
        generation_tokens_per_s=rates.get(GENERATION_TOKENS),
    )


def _interval(pairs: list[tuple[_Read | None, _Read]]) -> float | None:
    """Seconds covered by the window: every endpoint is read at once, so any pair tells."""
    spans = [now - previous[0] for previous, (now, _) in pairs if previous and now > previous[0]]
    return max(spans) if spans and len(spans) == len(pairs) else None
