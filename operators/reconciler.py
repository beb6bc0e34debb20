"""Reconciler: one CapacityPolicy, one pass: read the target and the metrics, decide, resize.

Idempotent: it resizes only when the engine's desired size differs from the target's
current one, so running it twice in a row (or from two timer ticks) changes nothing
more. What it must remember between passes (the engine's `ScalingHistory`, the
scrape source with its previous read) lives in `PolicyMemory`, kept in kopf's per-
object memo and dropped with the policy; each part is kept only while what it was
built for stays: the history for one target and pool (a new target starts without the
old one's scale events), the source for one metrics spec.

A target a person scaled to 0 is left there, as an HPA leaves it: the policy reports
ScalingActive=False, ScalingDisabled, until the target has replicas again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from operators.condition import Condition, ConditionType
from operators.kube_api import KubeApi
from operators.metrics_source import MetricsSource, MetricsUnavailable
from operators.metrics_window import MetricsWindow
from operators.policy_engine import decide
from operators.policy_spec import CapacityPolicySpec, MetricsSpec, PrometheusSpec, ScaleTargetRef
from operators.policy_status import PolicyStatus, last_metrics
from operators.prometheus_source import PrometheusSource
from operators.scale_target import TargetUnavailable, resolve
from operators.scaling_history import ScalingHistory
from operators.scrape_source import ScrapeSource


@dataclass
class PolicyMemory:
    history: ScalingHistory = field(default_factory=ScalingHistory)
    history_key: tuple[ScaleTargetRef, str] | None = None  # the (target, pool) it is of
    source: MetricsSource | None = None
    source_key: tuple[MetricsSpec | None, str | None] | None = None  # what `source` was built from
    reported: str | None = None  # the API failure last posted as an Event, until a pass succeeds


SCALING_DISABLED = "ScalingDisabled"
_OFF = "scaling is disabled since the replica count of the target is zero"  # HPA's words


@dataclass(frozen=True)
class Outcome:
    status: PolicyStatus
    resized: tuple[int, int] | None = None  # (from, to) when the target was resized
    reason: str = ""  # why, for the Event: the signals that asked for it, or the limit


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        session: aiohttp.ClientSession,
        clock: Callable[[], float],
        default_prometheus: PrometheusSpec | None = None,
    ) -> None:
        self._api, self._session, self._clock = api, session, clock
        self._default_prometheus = default_prometheus

    async def reconcile(
        self, spec: CapacityPolicySpec, namespace: str, generation: int | None, memory: PolicyMemory
    ) -> Outcome:
        """Raises `KubeApiError` for transient API trouble; everything else becomes status."""
        if memory.history_key != (spec.scale_target_ref, spec.pool):
            memory.history = ScalingHistory()
            memory.history_key = (spec.scale_target_ref, spec.pool)
        try:
            target = await resolve(self._api, spec.scale_target_ref, namespace)
            current = await target.replicas()
        except TargetUnavailable as e:
            able = Condition(ConditionType.ABLE_TO_SCALE, False, e.reason, e.message)
            return Outcome(PolicyStatus(generation, (able,)))
        if current == 0:
            disabled = Condition(ConditionType.SCALING_ACTIVE, False, SCALING_DISABLED, _OFF)
            return Outcome(PolicyStatus(generation, (disabled,), 0, 0))

        policy = spec.pool_policy()
        metrics_problem: Condition | None = None
        try:
            window = await self._source(spec, memory).window()
        except MetricsUnavailable as e:
            window = MetricsWindow()
            metrics_problem = Condition(
                ConditionType.SCALING_ACTIVE, False, "FailedGetMetrics", str(e)
            )

        decision = decide(policy, window, current, memory.history, self._clock())
        memory.history = decision.history
        conditions = tuple(
            metrics_problem if metrics_problem and c.type is ConditionType.SCALING_ACTIVE else c
            for c in decision.conditions
            if c.type is not ConditionType.READY
        )
        seen = last_metrics(window, policy.pool)
        status = PolicyStatus(
            generation, conditions, current, decision.desired_replicas, seen, decision.signals
        )
        if not decision.changes:
            return Outcome(status)
        try:
            await target.resize(decision.desired_replicas)
        except TargetUnavailable as e:
            able = Condition(ConditionType.ABLE_TO_SCALE, False, e.reason, e.message)
            kept = tuple(c for c in conditions if c.type is not ConditionType.ABLE_TO_SCALE)
            failed = PolicyStatus(
                generation,
                (*kept, able),
                current,
                decision.desired_replicas,
                seen,
                decision.signals,
            )
            return Outcome(failed)
        memory.history = decision.applied(self._clock())
        limited = decision.condition(ConditionType.SCALING_LIMITED)
        why = ", ".join(f"{s.name} {s.observed:g}/{s.target:g}" for s in decision.signals)
        return Outcome(
            PolicyStatus(
                generation,
                conditions,
                decision.desired_replicas,
                decision.desired_replicas,
                seen,
                decision.signals,
                scaled=True,
            ),
            resized=(current, decision.desired_replicas),
            reason=why + (f"; {limited.reason}" if limited.status else ""),
        )

    def _source(self, spec: CapacityPolicySpec, memory: PolicyMemory) -> MetricsSource:
        """The policy's metrics source, rebuilt only when its spec changed (a scrape
        source must keep its previous read to compute rates and percentiles)."""
        key = (spec.metrics, spec.model)
        if memory.source is None or memory.source_key != key:
            memory.source, memory.source_key = self._build_source(spec), key
        return memory.source

    def _build_source(self, spec: CapacityPolicySpec) -> MetricsSource:
        metrics = spec.metrics
        if metrics is not None and metrics.scrape is not None and metrics.source == "scrape":
            return ScrapeSource(
                metrics.scrape.endpoints,
                self._session,
                spec.model,
                metrics.scrape.timeout_seconds,
            )
        prom = metrics.prometheus if metrics is not None else self._default_prometheus
        if prom is None:
            raise MetricsUnavailable(
                "spec.metrics is not set and the operator has no --metrics-source"
            )
        return PrometheusSource(
            prom.url,
            self._session,
            spec.model,
            prom.metric_prefix,
            prom.selector,
            prom.rate_window,
        )
