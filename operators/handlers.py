"""The kopf handlers of `baton operator`: one timer per CapacityPolicy, plus plumbing.

Timer-driven, so every pass reconciles from scratch and a missed watch event costs
nothing; the interval is a setting (`--interval`). Deleting a policy stops its timer
(kopf holds a finalizer until it has), so nothing scales the target afterwards.
The timer writes `patch.status` rather than returning a value: a return value would land
under `status.<handler id>`, and the CRD's status fields (and printer columns) are
top-level.

`build_registry` takes an `OperatorConfig` so that tests can hand in the emulator's
connection and a clock they advance by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from operators.condition import Condition, ConditionType
from operators.kube_api import KubeApi, KubeApiError
from operators.policy_spec import GROUP, PLURAL, VERSION, CapacityPolicySpec
from operators.policy_status import PolicyStatus
from operators.reconciler import PolicyMemory, Reconciler

FINALIZER = "baton.dev/capacitypolicy"


@dataclass(frozen=True)
class OperatorConfig:
    interval_s: float = 15.0
    default_prometheus_url: str | None = None  # for policies without spec.metrics
    clock: Callable[[], float] = time.time  # epoch seconds: windows, lastScaleTime
    connection: kopf.ConnectionInfo | None = None  # None: service account, else kubeconfig


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    api = KubeApi()

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = (
            config.connection
            or kopf.login_with_service_account(**kwargs)
            or kopf.login_with_kubeconfig(**kwargs)
        )
        if info is not None:
            await api.connect(info)
        return info

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.reporting_component = "baton-operator"
        memo.session = aiohttp.ClientSession()  # metrics: Prometheus or the pools' /metrics
        memo.reconciler = Reconciler(api, memo.session, config.clock, config.default_prometheus_url)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.session.close()
        await api.close()

    @kopf.timer(GROUP, VERSION, PLURAL, interval=config.interval_s, registry=registry)
    async def reconcile(
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        body: kopf.Body,
        namespace: str | None,
        memo: kopf.Memo,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        assert namespace is not None, "CapacityPolicy is a namespaced resource"
        generation = meta.get("generation")
        try:
            parsed = CapacityPolicySpec.model_validate(dict(spec))
        except ValidationError as e:
            invalid = Condition(ConditionType.ABLE_TO_SCALE, False, "InvalidSpec", str(e))
            rendered = PolicyStatus(generation, (invalid,)).render(status, config.clock())
            patch.status.update(rendered)
            _warn_on_new_failure(body, status, rendered["conditions"])
            raise kopf.PermanentError(f"invalid CapacityPolicy spec: {e}") from e

        memory: PolicyMemory = memo.setdefault("policy", PolicyMemory())
        try:
            outcome = await memo.reconciler.reconcile(parsed, namespace, generation, memory)
        except KubeApiError as e:
            raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=config.interval_s) from e

        rendered = outcome.status.render(status, config.clock())
        patch.status.update(rendered)
        if outcome.resized is not None:
            old, new = outcome.resized
            kopf.info(
                body,
                reason="SuccessfulRescale",
                message=f"New size: {new} (was {old}); reason: {outcome.reason}",
            )
        _warn_on_new_failure(body, status, rendered["conditions"])

    return registry


def _warn_on_new_failure(
    body: kopf.Body, previous: kopf.Status, conditions: list[dict[str, Any]]
) -> None:
    """A Warning Event when a condition turns False or changes reason, not on every pass."""
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    for c in conditions:
        if c["type"] not in ("AbleToScale", "ScalingActive") or c["status"] != "False":
            continue
        old = before.get(c["type"], {})
        if old.get("status") != "False" or old.get("reason") != c["reason"]:
            kopf.warn(body, reason=c["reason"], message=c["message"])
