"""MetricsPage: the router's GET /metrics, its own series and every pool replica's.

Each read asks every replica for its series (Ray `broadcast`, or the in-process servers)
and merges them per pool (services.telemetry.render). A replica that stops answering,
scaled away or restarted, keeps its counters and histograms on the page, so each pool's
totals never go down (a rate() over them stays right); its gauges leave with it.
"""

from __future__ import annotations

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

    async def render(self) -> str:
        answered: dict[str, tuple[Series, ...]] = {}
        for read in self.pools:
            try:
                answered.update((s.source, s.series) for s in await read())
            except Exception as e:  # a replica starting or stopping: keep what we have
                log.warning("reading pool metrics failed: %s", e)
                return self.telemetry.render(*self._replicas.values())
        for source, series in self._replicas.items():
            if source not in answered:
                self._replicas[source] = tuple(s for s in series if s.metric.kind != "gauge")
        self._replicas.update(answered)
        return self.telemetry.render(*self._replicas.values())


def pipeline_readings(pipeline: DisaggregatedPipeline) -> list[Reading]:
    """The router's own counters: why decode prefilled locally, requests migrated."""
    readings = [
        Reading(FALLBACKS, n, {"pool": "decode", "reason": reason})
        for reason, n in sorted(pipeline.local_prefills.items())
    ]
    readings.append(Reading(MIGRATIONS, pipeline.migrations, {"pool": "decode"}))
    return readings
