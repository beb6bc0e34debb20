"""MetricsPage: the router's GET /metrics, the same totals on every router replica.

The page is cluster-wide: every router replica's own series (TTFT, ITL and E2E as the
router sees them, fallbacks, migrations) and every pool replica's, merged per pool
(services.telemetry.render). Whichever router replica answers, the totals are the same,
so one scrape of the router Service per interval reads the whole platform (the chart's
ScrapeConfig, the operator's `source: scrape`); a scrape per router pod would count
everything once per pod.

Each read asks every replica for its series: the pools' (Ray `broadcast`, or the
in-process servers) and the router replicas' (`peers`: a broadcast of `shared` to the
router deployment; none in process, where the router is alone). This replica's own
series are always read live.

A replica that stops answering, scaled away or restarted, keeps its counters and
histograms on the page, so totals never go down (a rate() over them stays right); its
gauges leave with it. Router replicas tell each other what they keep, and a replica
keeps the furthest-advanced copy of each departed source it hears of, so a router that
started after a replica left (a restarted router pod) serves the same totals as the
others. A read that fails (a replica erroring or too slow fails the whole broadcast) is
read as if all its replicas stopped answering, until it answers again: their totals
stay, their gauges are not served stale, and the other reads' series stay live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.router.disaggregated import DisaggregatedPipeline
from services.telemetry import (
    FALLBACKS,
    MIGRATIONS,
    Reading,
    Series,
    Snapshot,
    Telemetry,
    render,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

ReplicaMetrics = Callable[[], Awaitable[list[Snapshot]]]
"""One pool's replicas' snapshots, e.g. `RayDecodePool.metrics`."""


@dataclass(frozen=True)
class RouterSeries:
    """What one router replica tells the others: its own series, live, and the counters
    and histograms it keeps of every other source it has read or heard of."""

    own: Snapshot
    kept: tuple[Snapshot, ...]


RouterReplicas = Callable[[], Awaitable[list[RouterSeries]]]
"""Every router replica's `MetricsPage.shared()`, this one's included."""


class MetricsPage:
    def __init__(
        self,
        telemetry: Telemetry,
        pools: Sequence[ReplicaMetrics],
        peers: RouterReplicas | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.pools = list(pools)
        self.peers = peers
        self._replicas: dict[str, tuple[Series, ...]] = {}
        self._failing: set[int] = set()  # reads (by index) whose last attempt failed

    async def render(self) -> str:
        peers = self.peers or _alone
        pools, (routers,) = await asyncio.gather(
            asyncio.gather(*(read() for read in self.pools), return_exceptions=True),
            asyncio.gather(peers(), return_exceptions=True),
        )
        live: dict[str, tuple[Series, ...]] = {}
        heard: list[Snapshot] = []
        for i, (read, result) in enumerate(zip(self.pools, pools, strict=True)):
            if (snapshots := self._answer(i, read, result)) is not None:
                live.update((s.source, s.series) for s in snapshots)
        for router in self._answer(len(pools), peers, routers) or []:
            live[router.own.source] = router.own.series
            heard.extend(router.kept)
        own = self.telemetry.snapshot()
        live[own.source] = own.series
        for source, series in self._replicas.items():
            if source not in live:
                self._replicas[source] = _totals(series)
        for snapshot in heard:
            kept = self._replicas.get(snapshot.source, ())
            if snapshot.source not in live and _progress(snapshot.series) > _progress(kept):
                self._replicas[snapshot.source] = _totals(snapshot.series)
        self._replicas.update(live)
        every = (s for group in self._replicas.values() for s in group)
        return render(every, self.telemetry.metrics)

    def shared(self) -> RouterSeries:
        """This replica's part of every router replica's page (`peers`)."""
        own = self.telemetry.snapshot()
        kept = tuple(
            Snapshot(source, _totals(series))
            for source, series in self._replicas.items()
            if source != own.source
        )
        return RouterSeries(own, kept)

    def _answer(self, i: int, read: Callable[[], object], result: T | BaseException) -> T | None:
        """What read `i` answered, or None if it failed (logged once per outage)."""
        name = getattr(read, "__qualname__", repr(read))
        if isinstance(result, Exception):
            if i not in self._failing:
                self._failing.add(i)
                log.warning(
                    "reading %s failed; serving its totals without its gauges until it answers: %r",
                    name,
                    result,
                )
            return None
        if isinstance(result, BaseException):  # cancelled: not a replica's failure
            raise result
        if i in self._failing:
            self._failing.discard(i)
            log.info("reading %s works again", name)
        return result


async def _alone() -> list[RouterSeries]:
    return []


def _totals(series: Iterable[Series]) -> tuple[Series, ...]:
    """What stays of a source that no longer answers: its counters and histograms."""
    return tuple(s for s in series if s.metric.kind != "gauge")


def _progress(series: Iterable[Series]) -> float:
    """How far one source's totals have come. They never go down, so of two copies of the
    same source the one with more is the later."""
    return sum(sum(s.counts) if s.counts else s.value for s in _totals(series))


def pipeline_readings(pipeline: DisaggregatedPipeline) -> list[Reading]:
    """The router's own counters: why decode prefilled locally, requests migrated."""
    readings = [
        Reading(FALLBACKS, n, {"pool": "decode", "reason": reason})
        for reason, n in sorted(pipeline.local_prefills.items())
    ]
    readings.append(Reading(MIGRATIONS, pipeline.migrations, {"pool": "decode"}))
    return readings
