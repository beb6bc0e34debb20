"""Which target a policy scales, and when it leaves one alone: a target another policy
already scales, a target a person scaled to zero, and a target changed under a policy."""

from __future__ import annotations

import asyncio

import pytest

from tests.operator.cluster import DEPLOYMENTS, Cluster
from tests.operator.conftest import INTERVAL_S, eventually
from tests.operator.telemetry_page import TelemetryPage
from tests.operator.test_operator import (
    DEPLOYMENT_REF,
    NS,
    UNLIMITED,
    condition,
    create_deployment,
    create_policy,
    decode_spec,
    events,
    merge_patch,
    policy_status,
)

pytestmark = pytest.mark.usefixtures("operator")

POLICIES = f"/apis/baton.dev/v1alpha1/namespaces/{NS}/capacitypolicies"


def replicas(cluster: Cluster, name: str = "decode") -> int:
    return int(cluster.stored(DEPLOYMENTS, NS, name)["spec"]["replicas"])


def message(cluster: Cluster, policy: str, kind: str) -> str:
    return next(
        c["message"] for c in policy_status(cluster, policy)["conditions"] if c["type"] == kind
    )


async def test_only_the_oldest_of_two_policies_scales_their_target(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    telemetry.waiting.labels("decode", "smollm2").set(12)
    await create_deployment(cluster, "decode", 1)
    # "zeta" sorts after "alpha" but was created first: the creation time decides
    older = decode_spec(telemetry, DEPLOYMENT_REF, behavior=UNLIMITED)  # 12 / 2: 6 replicas
    await create_policy(cluster, "zeta", older, created="2025-12-01T00:00:00Z")
    newer = decode_spec(
        telemetry, DEPLOYMENT_REF, objectives={"queueDepthPerReplica": 1.5}, behavior=UNLIMITED
    )  # 12 / 1.5: 8 replicas
    await create_policy(cluster, "alpha", newer, created="2026-01-01T00:00:00Z")

    await eventually(
        lambda: condition(cluster, "alpha", "AbleToScale") == ("False", "AmbiguousTarget")
    )
    assert condition(cluster, "alpha", "Ready") == ("False", "AmbiguousTarget")
    assert message(cluster, "alpha", "AbleToScale") == (
        "Deployment decode is also the target of CapacityPolicy zeta, which is older; "
        "this policy leaves it alone while zeta exists"
    )
    await eventually(lambda: replicas(cluster) == 6)
    await asyncio.sleep(10 * INTERVAL_S)  # ten passes of both timers
    assert replicas(cluster) == 6
    assert events(cluster, "alpha", "SuccessfulRescale") == []
    assert len(events(cluster, "zeta", "SuccessfulRescale")) == 1
    (warning,) = events(cluster, "alpha", "AmbiguousTarget")  # warned once
    assert warning["type"] == "Warning"
    assert warning["message"] == message(cluster, "alpha", "AbleToScale")  # names zeta
    assert condition(cluster, "zeta", "Ready") == ("True", "Reconciled")

    async with cluster.delete(f"{POLICIES}/zeta") as r:
        assert r.status == 200
    await eventually(lambda: replicas(cluster) == 8)  # the other one takes over
    await eventually(lambda: condition(cluster, "alpha", "Ready") == ("True", "Reconciled"))


async def test_a_policy_left_out_is_told_of_each_new_owner(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    telemetry.waiting.labels("decode", "smollm2").set(12)
    await create_deployment(cluster, "decode", 1)
    spec = decode_spec(telemetry, DEPLOYMENT_REF, behavior=UNLIMITED)
    await create_policy(cluster, "first", spec, created="2025-11-01T00:00:00Z")
    await eventually(lambda: replicas(cluster) == 6)
    await create_policy(cluster, "second", spec, created="2025-12-01T00:00:00Z")
    await eventually(lambda: events(cluster, "second", "AmbiguousTarget"))
    await create_policy(cluster, "third", spec, created="2026-01-01T00:00:00Z")
    await eventually(lambda: events(cluster, "third", "AmbiguousTarget"))

    async with cluster.delete(f"{POLICIES}/first") as r:
        assert r.status == 200
    await eventually(lambda: condition(cluster, "second", "Ready") == ("True", "Reconciled"))
    await eventually(lambda: len(events(cluster, "third", "AmbiguousTarget")) == 2)
    await asyncio.sleep(10 * INTERVAL_S)  # ten passes: no Event but on a change of owner
    assert [e["message"] for e in events(cluster, "third", "AmbiguousTarget")] == [
        f"Deployment decode is also the target of CapacityPolicy {owner}, which is older; "
        f"this policy leaves it alone while {owner} exists"
        for owner in ("first", "second")
    ]
    assert {e["type"] for e in events(cluster, "third", "AmbiguousTarget")} == {"Warning"}
    assert len(events(cluster, "second", "AmbiguousTarget")) == 1


async def test_a_new_target_is_not_rate_limited_by_the_old_one(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    telemetry.waiting.labels("decode", "smollm2").set(16)  # 8 replicas' worth
    await create_deployment(cluster, "a", 4)
    await create_deployment(cluster, "b", 2)
    # default behavior: up by 100% or 4 pods per 15 s, whichever is more
    await create_policy(cluster, "dec", decode_spec(telemetry, {**DEPLOYMENT_REF, "name": "a"}))
    await eventually(lambda: replicas(cluster, "a") == 8)

    await merge_patch(cluster, f"{POLICIES}/dec", {"spec": {"scaleTargetRef": {"name": "b"}}})
    # b may grow from 2 by max(100%, 4) = 6 within the period; counting a's +4 as b's
    # would hold it at 2 (the hand clock stands still, so the period never ends)
    await eventually(lambda: replicas(cluster, "b") == 6, timeout_s=10)
    await eventually(
        lambda: condition(cluster, "dec", "ScalingLimited") == ("True", "ScaleUpLimit")
    )
    assert replicas(cluster, "a") == 8


async def test_a_target_scaled_to_zero_is_left_at_zero(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    telemetry.waiting.labels("decode", "smollm2").set(12)
    await create_deployment(cluster, "decode", 2)
    await create_policy(cluster, "dec", decode_spec(telemetry, DEPLOYMENT_REF, behavior=UNLIMITED))
    await eventually(lambda: replicas(cluster) == 6)

    deployment = f"/apis/apps/v1/namespaces/{NS}/deployments/decode"
    await merge_patch(cluster, deployment, {"spec": {"replicas": 0}})  # a person turns it off
    await eventually(
        lambda: condition(cluster, "dec", "ScalingActive") == ("False", "ScalingDisabled")
    )
    off = "scaling is disabled since the replica count of the target is zero"
    assert message(cluster, "dec", "Ready") == off
    status = policy_status(cluster, "dec")
    assert (status["currentReplicas"], status["desiredReplicas"]) == (0, 0)
    (event,) = await eventually(lambda: events(cluster, "dec", "ScalingDisabled"))
    assert (event["type"], event["message"]) == ("Normal", off)  # a choice, not a fault
    await asyncio.sleep(10 * INTERVAL_S)
    assert replicas(cluster) == 0
    assert len(events(cluster, "dec", "SuccessfulRescale")) == 1
    assert len(events(cluster, "dec", "ScalingDisabled")) == 1  # when it began, not every pass

    await merge_patch(cluster, deployment, {"spec": {"replicas": 1}})  # and on again
    await eventually(lambda: replicas(cluster) == 6)
    await eventually(lambda: condition(cluster, "dec", "Ready") == ("True", "Reconciled"))
