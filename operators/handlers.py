"""The kopf handlers of `baton operator`: one timer per CapacityPolicy, plus plumbing.

Timer-driven, so every pass reconciles from scratch and a missed watch event costs
nothing; the interval is a setting (`--interval`). Deleting a policy stops its timer
(kopf holds a finalizer until it has), so nothing scales the target afterwards.
An index of every policy's target (`target_claim`) lets only the oldest of several
policies on one target scale it.

The timer merge-patches the status subresource itself rather than returning a value
or filling kopf's `patch`: a return value would land under `status.<handler id>` (the
CRD's status fields and printer columns are top-level), and kopf applies `patch` after
the handler, where a refused write ends the timer for good (kopf 1.45). Here a refused
status write, like any Kubernetes API error of a pass, is logged by kopf as a
temporary error and posted once as a Warning Event, and the next pass runs as usual.
A condition that stops the policy from scaling is posted when it begins, not on every
pass (AmbiguousTarget again when another policy becomes the owner): a Warning, but a
Normal Event for ScalingDisabled, which a person chose by scaling the target to zero (an
HPA reports that as a condition, not as a failure).

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
from operators.policy_spec import (
    GROUP,
    PLURAL,
    VERSION,
    CapacityPolicySpec,
    PrometheusSpec,
    describe,
)
from operators.policy_status import PolicyStatus
from operators.reconciler import SCALING_DISABLED, Outcome, PolicyMemory, Reconciler
from operators.target_claim import (
    AMBIGUOUS_TARGET,
    TargetClaim,
    TargetKey,
    ambiguity,
    claims_of,
)

FINALIZER = "baton.dev/capacitypolicy"
_CHOSEN = frozenset({SCALING_DISABLED})  # a person's choice, not a fault: a Normal Event
_NAMES_OWNER = frozenset({AMBIGUOUS_TARGET})  # a message naming another owner is news again


@dataclass(frozen=True)
class OperatorConfig:
    interval_s: float = 15.0
    default_prometheus: PrometheusSpec | None = None  # for policies without spec.metrics
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
        memo.reconciler = Reconciler(api, memo.session, config.clock, config.default_prometheus)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.session.close()
        await api.close()

    @kopf.index(GROUP, VERSION, PLURAL, id="policy_targets", registry=registry)
    def policy_targets(
        namespace: str | None, meta: kopf.Meta, spec: kopf.Spec, **_: Any
    ) -> dict[TargetKey, TargetClaim]:
        assert namespace is not None, "CapacityPolicy is a namespaced resource"
        return claims_of(namespace, meta, spec)

    @kopf.timer(GROUP, VERSION, PLURAL, interval=config.interval_s, registry=registry)
    async def reconcile(
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        body: kopf.Body,
        namespace: str | None,
        memo: kopf.Memo,
        **kwargs: Any,
    ) -> None:
        assert namespace is not None, "CapacityPolicy is a namespaced resource"
        claims: kopf.Index[TargetKey, TargetClaim] = kwargs["policy_targets"]  # the index above
        generation = meta.get("generation")
        memory: PolicyMemory = memo.setdefault("policy", PolicyMemory())
        try:
            parsed = CapacityPolicySpec.model_validate(dict(spec))
        except ValidationError as e:
            invalid = Condition(ConditionType.ABLE_TO_SCALE, False, "InvalidSpec", describe(e))
            await publish(body, status, memory, Outcome(PolicyStatus(generation, (invalid,))))
            raise kopf.PermanentError(f"invalid CapacityPolicy spec: {invalid.message}") from e

        contested = ambiguity(claims, namespace, meta, parsed.scale_target_ref)
        if contested is not None:
            await publish(body, status, memory, Outcome(PolicyStatus(generation, (contested,))))
            return
        try:
            outcome = await memo.reconciler.reconcile(parsed, namespace, generation, memory)
        except KubeApiError as e:
            raise _failed(body, memory, "FailedReconcile", f"Kubernetes API: {e}") from e
        await publish(body, status, memory, outcome)

    async def publish(
        body: kopf.Body, previous: kopf.Status, memory: PolicyMemory, outcome: Outcome
    ) -> None:
        """Post the pass's Events and write its status."""
        if outcome.resized is not None:
            old, new = outcome.resized
            kopf.info(
                body,
                reason="SuccessfulRescale",
                message=f"New size: {new} (was {old}); reason: {outcome.reason}",
            )
        rendered = outcome.status.render(previous, config.clock())
        meta = body.metadata
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{meta.namespace}/{PLURAL}/{meta.name}/status"
        try:
            await api.merge_patch(path, {"status": rendered})
        except KubeApiError as e:
            raise _failed(
                body, memory, "FailedUpdateStatus", f"cannot write the status: {e}"
            ) from e
        memory.reported = None
        _post_new_conditions(body, previous, rendered["conditions"])

    def _failed(
        body: kopf.Body, memory: PolicyMemory, reason: str, message: str
    ) -> kopf.TemporaryError:
        """A Warning Event for an API failure, once until the failure changes or a pass
        succeeds (kopf logs every retry); the error to raise so that kopf retries it."""
        if memory.reported != message:
            memory.reported = message
            kopf.warn(body, reason=reason, message=message)
        return kopf.TemporaryError(message, delay=config.interval_s)

    return registry


def _post_new_conditions(
    body: kopf.Body, previous: kopf.Status, conditions: list[dict[str, Any]]
) -> None:
    """An Event when AbleToScale or ScalingActive turns False or changes reason, or when
    AmbiguousTarget names another policy (the one it named is gone): not on every pass."""
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    for c in conditions:
        if c["type"] not in ("AbleToScale", "ScalingActive") or c["status"] != "False":
            continue
        old = before.get(c["type"], {})
        known = old.get("status") == "False" and old.get("reason") == c["reason"]
        if known and (c["reason"] not in _NAMES_OWNER or old.get("message") == c["message"]):
            continue
        post = kopf.info if c["reason"] in _CHOSEN else kopf.warn
        post(body, reason=c["reason"], message=c["message"])
