"""Autoscaler: the policy engine with memory, for loops that scrape and resize on their own.

`baton serve --policy policy.yaml` (the local autoscaler) and the simulator drive it:

    autoscaler = Autoscaler(load_policy_file(path))
    while running:
        window = await source.window()                   # e.g. ScrapeSource over /metrics
        for decision in autoscaler.step(window, replicas(), clock()).values():
            if decision.changes:
                set_num_replicas(decision.pool, decision.desired_replicas)  # Ray Serve
                autoscaler.applied(decision, clock())

The kopf operator keeps the same `ScalingHistory` per CapacityPolicy in kopf's memo.
"""

from __future__ import annotations

from collections.abc import Mapping

from operators.metrics_window import MetricsWindow
from operators.policy_engine import Decision, plan
from operators.pool_policy import Pool, PoolPolicy
from operators.scaling_history import ScalingHistory


class Autoscaler:
    def __init__(self, policies: Mapping[Pool, PoolPolicy]) -> None:
        assert policies, "an autoscaler needs at least one pool policy"
        self.policies = dict(policies)
        self._histories: dict[Pool, ScalingHistory] = {}

    def step(
        self, window: MetricsWindow, current: Mapping[Pool, int], now: float
    ) -> dict[Pool, Decision]:
        """Decide every pool; remembers the recommendations for the next step."""
        decisions = plan(self.policies, window, current, self._histories, now)
        self._histories.update({pool: d.history for pool, d in decisions.items()})
        return decisions

    def applied(self, decision: Decision, now: float) -> None:
        """Record that `decision` was carried out, for the step policies' periods."""
        self._histories[decision.pool] = decision.applied(now)
