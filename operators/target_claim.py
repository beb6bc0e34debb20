"""TargetClaim: which CapacityPolicy scales a target that several policies name.

Two policies resizing one target undo each other on every pass while both report
Ready. As the HPA controller refuses to act on a pod selected by two HPAs
(`AmbiguousSelector`), only the oldest policy (by creationTimestamp, then name) scales
a target; any other reports AbleToScale=False, `AmbiguousTarget`, naming it, and
leaves the target alone until that policy is gone.

kopf keeps every policy's claim in an index fed by the watch stream (`claims_of` is
its handler); a policy's timer looks its target up there (`ambiguity`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from operators.condition import Condition, ConditionType
from operators.policy_spec import CapacityPolicySpec, ScaleTargetRef

AMBIGUOUS_TARGET = "AmbiguousTarget"

# namespace, API group, kind, name, Serve deployment: two API versions are one object
TargetKey = tuple[str, str, str, str, str | None]


@dataclass(frozen=True, order=True)
class TargetClaim:
    created: str  # creationTimestamp: RFC 3339 in UTC, so it sorts as time does
    policy: str  # the policy's name


def _target_key(namespace: str, ref: ScaleTargetRef) -> TargetKey:
    return namespace, ref.api_version.rpartition("/")[0], ref.kind, ref.name, ref.deployment


def _claim(meta: Mapping[str, Any]) -> TargetClaim:
    return TargetClaim(meta.get("creationTimestamp", ""), meta["name"])


def claims_of(
    namespace: str, meta: Mapping[str, Any], spec: Mapping[str, Any]
) -> dict[TargetKey, TargetClaim]:
    """A policy's claim on its target. None while its spec is invalid or it is being
    deleted: it scales nothing then, so it must not hold another policy off."""
    if meta.get("deletionTimestamp"):
        return {}
    try:
        parsed = CapacityPolicySpec.model_validate(dict(spec))
    except ValidationError:
        return {}
    return {_target_key(namespace, parsed.scale_target_ref): _claim(meta)}


def ambiguity(
    claims: Mapping[TargetKey, Iterable[TargetClaim]],
    namespace: str,
    meta: Mapping[str, Any],
    ref: ScaleTargetRef,
) -> Condition | None:
    """AbleToScale=False when an older policy claims the policy's target `ref`, else None."""
    mine = _claim(meta)
    oldest = min((*claims.get(_target_key(namespace, ref), ()), mine))
    if oldest.policy == mine.policy:
        return None
    what = f"{ref.kind} {ref.name}" + (f" deployment {ref.deployment}" if ref.deployment else "")
    return Condition(
        ConditionType.ABLE_TO_SCALE,
        False,
        AMBIGUOUS_TARGET,
        f"{what} is also the target of CapacityPolicy {oldest.policy}, which is older; "
        f"this policy leaves it alone while {oldest.policy} exists",
    )
