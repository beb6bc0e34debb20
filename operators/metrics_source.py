"""MetricsSource: where a CapacityPolicy's metrics window comes from.

Two implementations, chosen by the policy's `spec.metrics.source`:
`PrometheusSource` (PromQL over the Prometheus HTTP API) and `ScrapeSource` (the pools'
own `/metrics` pages, read directly). Both raise `MetricsUnavailable` when they cannot
answer; the operator reports that as ScalingActive=False and keeps the target's size.
"""

from __future__ import annotations

from typing import Protocol

from operators.metrics_window import MetricsWindow


class MetricsUnavailable(Exception):
    """The source could not be read (connection refused, HTTP error, malformed answer)."""


class MetricsSource(Protocol):
    async def window(self) -> MetricsWindow:
        """Both pools' metrics since the previous call (or over the source's range)."""
        ...
