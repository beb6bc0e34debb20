"""Histogram: cumulative Prometheus buckets, their difference over a window, and quantiles."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per upper bound `le`, ascending, the last bound +Inf."""

    buckets: tuple[tuple[float, float], ...]

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def __add__(self, other: Histogram) -> Histogram:
        """Merge two series (e.g. two replicas), bucket by bucket."""
        counts: dict[float, float] = {}
        for le, n in self.buckets + other.buckets:
            counts[le] = counts.get(le, 0.0) + n
        return Histogram(tuple(sorted(counts.items())))

    def since(self, earlier: Histogram) -> Histogram:
        """Observations after `earlier`; a counter that went down was reset, so all of ours."""
        before = dict(earlier.buckets)
        delta = tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets)
        if any(n < 0 for _, n in delta):
            return self
        return Histogram(delta)

    def quantile(self, q: float) -> float | None:
        """Prometheus' `histogram_quantile`: linear within the bucket holding the rank.

        A rank in the +Inf bucket answers the highest finite bound; no observations, None.
        """
        assert 0 <= q <= 1, q
        if self.count <= 0:
            return None
        rank = q * self.count
        lower_le, lower_n = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower_le
                if n == lower_n:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_n) / (n - lower_n)
            lower_le, lower_n = le, n
        return lower_le
