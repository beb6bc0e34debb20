"""Condition: one line of a CapacityPolicy's `status.conditions`, without timestamps.

The types and most reasons are the HorizontalPodAutoscaler's, so `kubectl describe`
reads the same; `Ready` sums the others up for the printer column.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ConditionType(StrEnum):
    READY = "Ready"
    SCALING_ACTIVE = "ScalingActive"  # metrics are there to decide on
    ABLE_TO_SCALE = "AbleToScale"  # the target can be read and resized
    SCALING_LIMITED = "ScalingLimited"  # min/max or a step policy cut the desired size


@dataclass(frozen=True)
class Condition:
    type: ConditionType
    status: bool
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "True" if self.status else "False"


def ready(conditions: tuple[Condition, ...]) -> Condition:
    """Ready when the policy can both measure and act; otherwise the first reason why not."""
    for c in conditions:
        if c.type in (ConditionType.SCALING_ACTIVE, ConditionType.ABLE_TO_SCALE) and not c.status:
            return Condition(ConditionType.READY, False, c.reason, c.message)
    return Condition(
        ConditionType.READY, True, "Reconciled", "the target is sized by the policy's objectives"
    )
