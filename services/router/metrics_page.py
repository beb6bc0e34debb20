"""MetricsPage: the router's GET /metrics, its own series and every pool replica's.

Each read asks every replica for its series (Ray `broadcast`, or the in-process servers)
and merges them per pool (services.telemetry.render). A replica that stops answering,
scaled away or restarted, keeps its counters and histograms on the page, so each pool's
totals never go down (a rate() over them stays right); its gauges leave with it. A pool
whose read fails (a replica erroring or too slow fails the whole broadcast) is read as
if all its replicas stopped answering, until it answers again: its totals stay, its
gauges are not served stale, and the other pools' series stay live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from services.router.disaggregated import DisaggregatedPipeline
from services.telemetry import FALLBACKS, MIGRATIONS, Reading, Series, Snapshot, Telemetry

log = logging.getLogger(__name__)

ReplicaMetrics = Callable[[], Awaitable[list[Snapshot]]]
"""One pool's replicas' snapshots, e.g. `RayDecodePool.metrics`."""


class MetricsPage:
    def __init__(self, telemetry: Telemetry, pools: Sequence[ReplicaMetrics]) -> None:
        self.telemetry = telemetry
        self.pools = list(pools)
        self._replicas: dict[str, tuple[Series, ...]] = {}
        self._failing: set[int] = set()  # pools whose last read failed: logged once

    async def render(self) -> str:
        reads = await asyncio.gather(*(read() for read in self.pools), return_exceptions=True)
        answered: dict[str, tuple[Series, ...]] = {}
        for i, (read, snapshots) in enumerate(zip(self.pools, reads, strict=True)):
            if isinstance(snapshots, Exception):
                if i not in self._failing:
                    self._failing.add(i)
                    log.warning(
                        "reading %s failed; serving its totals without its gauges until it "
                        "answers: %r",
                        _name(read),
                        snapshots,
                    )
                continue
            if isinstance(snapshots, BaseException):  # cancelled: not a pool's failure
                raise snapshots
            if i in self._failing:
                self._failing.discard(i)
                log.info("reading %s works again", _name(read))
            answered.update((s.source, s.series) for s in snapshots)
        for source, series in self._replicas.items():
            if source not in answered:
                self._replicas[source] = tuple(s for s in series if s.metric.kind != "gauge")
        self._replicas.update(answered)
        return self.telemetry.render(*self._replicas.values())


def _name(read: ReplicaMetrics) -> str:
    return getattr(read, "__qualname__", repr(read))


def pipeline_readings(pipeline: DisaggregatedPipeline) -> list[Reading]:
    """The router's own counters: why decode prefilled locally, requests migrated."""
    readings = [
        Reading(FALLBACKS, n, {"pool": "decode", "reason": reason})
        for reason, n in sorted(pipeline.local_prefills.items())
    ]
    readings.append(Reading(MIGRATIONS, pipeline.migrations, {"pool": "decode"}))
    return readings
