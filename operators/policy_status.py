"""PolicyStatus: a CapacityPolicy's `status`, rendered from what one reconcile learned.

Conditions keep their `lastTransitionTime` while their status stays the same, as
Kubernetes API conventions ask; a condition this reconcile did not evaluate (metrics
are not read when the target is missing) keeps its previous entry, and so do the
metrics. The rendering is a merge patch: a metric the previous pass saw and this one
did not is patched to null (removed), and numbers are finite, since JSON has no NaN or
Infinity and the API server refuses a body with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from operators.condition import Condition, ConditionType, ready
from operators.demand import Signal
from operators.metrics_window import MetricsWindow, finite
from operators.pool_policy import Pool

_ORDER = list(ConditionType)


def timestamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PolicyStatus:
    generation: int | None
    conditions: tuple[Condition, ...]  # without Ready: it is derived here
    current_replicas: int | None = None
    desired_replicas: int | None = None
    metrics: Mapping[str, float] | None = None  # `last_metrics` of the window decided on
    signals: tuple[Signal, ...] = ()
    scaled: bool = False

    def render(self, previous: Mapping[str, Any], now: float) -> dict[str, Any]:
        """The `status` patch, given the status the object has now."""
        out: dict[str, Any] = {
            "observedGeneration": self.generation,
            "conditions": self._conditions(previous.get("conditions") or [], now),
        }
        if self.current_replicas is not None:
            out["currentReplicas"] = self.current_replicas
        if self.desired_replicas is not None:
            out["desiredReplicas"] = self.desired_replicas
        if self.metrics is not None:  # a decision was made: what it saw replaces the last
            seen = {k: v for k, v in self.metrics.items() if finite(v) is not None}
            out["lastMetrics"] = dict.fromkeys(previous.get("lastMetrics") or {}) | seen
            out["recommendations"] = [
                {
                    "signal": s.name,
                    "observed": round(s.observed, 6),
                    "target": round(s.target, 6),
                    "replicas": s.replicas,
                }
                for s in self.signals
                if finite(s.observed) is not None and finite(s.target) is not None
            ]
        if self.scaled:
            out["lastScaleTime"] = timestamp(now)
        return out

    def _conditions(
        self, previous: Sequence[Mapping[str, Any]], now: float
    ) -> list[dict[str, Any]]:
        before = {c.get("type"): c for c in previous}
        fresh = {c.type: c for c in self.conditions}
        kept = [
            Condition(
                ConditionType(t),
                c.get("status") == "True",
                c.get("reason", ""),
                c.get("message", ""),
            )
            for t, c in before.items()
            if t in _ORDER and t != ConditionType.READY and t not in fresh
        ]
        merged = sorted([*fresh.values(), *kept], key=lambda c: _ORDER.index(c.type))
        out = []
        for c in (ready(tuple(merged)), *merged):
            old = before.get(c.type, {})
            changed = old.get("status") != c.status_text
            out.append(
                {
                    "type": str(c.type),
                    "status": c.status_text,
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime": timestamp(now) if changed else old["lastTransitionTime"],
                    "observedGeneration": self.generation,
                }
            )
        return out


def last_metrics(window: MetricsWindow, pool: Pool) -> dict[str, float]:
    """What a decision saw, in the CRD's units (ms for latency); fields without data left out."""
    m = window.of(pool)
    values = {
        "ttftP90Ms": window.prefill.ttft_p90_s if pool is Pool.PREFILL else None,
        "itlP90Ms": m.itl_p90_s,
        "kvTransferP90Ms": window.decode.kv_transfer_p90_s,
        "kvCacheUtilization": m.kv_cache_usage,
        "requestsWaiting": m.requests_waiting,
        "requestsRunning": m.requests_running,
        "requestRate": m.request_rate,
        "inputTokensPerSecond": window.input_tokens_per_s,
        "outputTokensPerSecond": window.output_tokens_per_s,
    }
    scale = {"ttftP90Ms": 1e3, "itlP90Ms": 1e3, "kvTransferP90Ms": 1e3}
    return {k: round(v * scale.get(k, 1.0), 6) for k, v in values.items() if v is not None}
