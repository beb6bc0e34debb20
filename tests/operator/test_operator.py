"""The kopf operator end to end: kmock's emulated API server over HTTP (lists, watches,
patches, finalizers), a replica's real /metrics page, and a hand clock for the windows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml

from tests.operator.cluster import CAPACITY_POLICIES, DEPLOYMENTS, EVENTS, RAYSERVICES, Cluster
from tests.operator.conftest import INTERVAL_S, HandClock, eventually
from tests.operator.telemetry_page import TelemetryPage

pytestmark = pytest.mark.usefixtures("operator")

NS = "llm"
SERVE_CONFIG = """\
applications:
- name: baton
  import_path: services.router.app:build_app
  route_prefix: /
  deployments:
  - name: router
    num_replicas: 1
  - name: prefill
    num_replicas: 1
    ray_actor_options:
      num_cpus: 2
  - name: decode
    num_replicas: 2
"""


async def create(cluster: Cluster, api: str, obj: dict[str, Any]) -> None:
    async with cluster.post(f"{api}/namespaces/{NS}/{obj['kind'].lower()}s", json=obj) as r:
        assert r.status < 400, await r.text()


async def create_policy(
    cluster: Cluster, name: str, spec: dict[str, Any], created: str | None = None
) -> None:
    body = {"apiVersion": "baton.dev/v1alpha1", "kind": "CapacityPolicy"}
    meta = {"name": name, "namespace": NS}
    if created is not None:
        meta["creationTimestamp"] = created
    obj = {**body, "metadata": meta, "spec": spec}
    async with cluster.post(
        f"/apis/baton.dev/v1alpha1/namespaces/{NS}/capacitypolicies", json=obj
    ) as r:
        assert r.status < 400, await r.text()


async def create_deployment(cluster: Cluster, name: str, replicas: int) -> None:
    meta = {"name": name, "namespace": NS}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta}
    await create(cluster, "/apis/apps/v1", {**deployment, "spec": {"replicas": replicas}})


async def merge_patch(cluster: Cluster, path: str, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with cluster.patch(path, json=body, headers=headers) as r:
        assert r.status < 400, await r.text()


def policy_status(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.stored(CAPACITY_POLICIES, NS, name).get("status", {})


def condition(cluster: Cluster, name: str, kind: str) -> tuple[str, str] | None:
    for c in policy_status(cluster, name).get("conditions", []):
        if c["type"] == kind:
            return c["status"], c["reason"]
    return None


def events(cluster: Cluster, policy: str, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in cluster.all_of(EVENTS)
        if e["involvedObject"]["name"] == policy and e["reason"] == reason
    ]


def decode_spec(telemetry: TelemetryPage, target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "scaleTargetRef": target,
        "pool": "decode",
        "minReplicas": 1,
        "maxReplicas": 10,
        "objectives": {"queueDepthPerReplica": 2},
        "metrics": {"source": "scrape", "scrape": {"endpoints": [telemetry.url]}},
        **extra,
    }


DEPLOYMENT_REF = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "decode"}
UNLIMITED = {"scaleUp": {"policies": [{"type": "Pods", "value": 100, "periodSeconds": 15}]}}


async def test_new_policy_scales_its_target_and_posts_an_event(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    telemetry.waiting.labels("decode", "smollm2").set(12)  # 12 waiting / 2 per replica
    await create_deployment(cluster, "decode", 1)
    await create_policy(cluster, "dec", decode_spec(telemetry, DEPLOYMENT_REF, behavior=UNLIMITED))

    await eventually(lambda: cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 6)
    status = await eventually(
        lambda: (s := policy_status(cluster, "dec")).get("currentReplicas") == 6 and s
    )
    assert status["desiredReplicas"] == 6
    assert status["observedGeneration"] == 1
    assert status["lastMetrics"]["requestsWaiting"] == 12
    assert status["recommendations"] == [
        {"signal": "queueDepthPerReplica", "observed": 12, "target": 2, "replicas": 6}
    ]
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Ready": ("True", "Reconciled"),
        "ScalingActive": ("True", "ValidMetricFound"),
        "AbleToScale": ("True", "ReadyForNewScale"),
        "ScalingLimited": ("False", "DesiredWithinRange"),
    }
    (event,) = await eventually(lambda: events(cluster, "dec", "SuccessfulRescale"))
    assert event["message"] == "New size: 6 (was 1); reason: queueDepthPerReplica 12/2"
    assert event["type"] == "Normal"

    telemetry.waiting.labels("decode", "smollm2").set(100)  # asks for 50; max is 10
    await eventually(
        lambda: condition(cluster, "dec", "ScalingLimited") == ("True", "TooManyReplicas")
    )
    assert cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 10
    await eventually(lambda: len(events(cluster, "dec", "SuccessfulRescale")) == 2)


async def test_rayservice_windows_hold_scale_up_and_down(
    cluster: Cluster, telemetry: TelemetryPage, clock: HandClock
) -> None:
    rayservice = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "llm"}}
    await create(
        cluster, "/apis/ray.io/v1", {**rayservice, "spec": {"serveConfigV2": SERVE_CONFIG}}
    )
    waiting = telemetry.waiting.labels("decode", "smollm2")
    waiting.set(4)  # 2 replicas' worth: no change
    ref = {"apiVersion": "ray.io/v1", "kind": "RayService", "name": "llm", "deployment": "decode"}
    behavior = {
        "scaleUp": {"stabilizationWindowSeconds": 30, **UNLIMITED["scaleUp"]},
        "scaleDown": {"stabilizationWindowSeconds": 60},
    }
    await create_policy(cluster, "dec", decode_spec(telemetry, ref, behavior=behavior))
    await eventually(
        lambda: condition(cluster, "dec", "AbleToScale") == ("True", "ReadyForNewScale")
    )

    def decode_replicas() -> dict[str, int]:
        config = yaml.safe_load(cluster.stored(RAYSERVICES, NS, "llm")["spec"]["serveConfigV2"])
        return {d["name"]: d["num_replicas"] for d in config["applications"][0]["deployments"]}

    waiting.set(16)  # asks for 8, but 2 was recommended within the 30 s up-window
    await eventually(
        lambda: condition(cluster, "dec", "AbleToScale") == ("True", "ScaleUpStabilized")
    )
    assert decode_replicas() == {"router": 1, "prefill": 1, "decode": 2}
    clock.advance(31)
    await eventually(lambda: decode_replicas()["decode"] == 8)

    waiting.set(4)  # asks for 2, but 8 was recommended within the 60 s down-window
    await eventually(
        lambda: condition(cluster, "dec", "AbleToScale") == ("True", "ScaleDownStabilized")
    )
    assert decode_replicas()["decode"] == 8
    clock.advance(61)
    await eventually(lambda: decode_replicas()["decode"] == 2)

    assert decode_replicas() == {"router": 1, "prefill": 1, "decode": 2}
    config = yaml.safe_load(cluster.stored(RAYSERVICES, NS, "llm")["spec"]["serveConfigV2"])
    assert config == yaml.safe_load(SERVE_CONFIG)  # nothing but num_replicas was touched
    await eventually(lambda: len(events(cluster, "dec", "SuccessfulRescale")) == 2)
    messages = [e["message"] for e in events(cluster, "dec", "SuccessfulRescale")]
    assert messages == [
        "New size: 8 (was 2); reason: queueDepthPerReplica 16/2",
        "New size: 2 (was 8); reason: queueDepthPerReplica 4/2",
    ]


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        (DEPLOYMENT_REF, "TargetNotFound"),
        ({"apiVersion": "example.com/v1", "kind": "Widget", "name": "w"}, "FailedGetScale"),
    ],
)
async def test_missing_target_is_a_condition_not_a_crash(
    cluster: Cluster, telemetry: TelemetryPage, ref: dict[str, str], reason: str
) -> None:
    telemetry.waiting.labels("decode", "smollm2").set(6)
    await create_policy(cluster, "dec", decode_spec(telemetry, ref, behavior=UNLIMITED))
    await eventually(lambda: condition(cluster, "dec", "AbleToScale") == ("False", reason))
    assert condition(cluster, "dec", "Ready") == ("False", reason)
    (warning,) = await eventually(lambda: events(cluster, "dec", reason))
    assert warning["type"] == "Warning"

    if reason == "TargetNotFound":  # the operator kept going: the target appears, it is scaled
        await create_deployment(cluster, "decode", 1)
        await eventually(lambda: cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 3)
        await eventually(lambda: condition(cluster, "dec", "Ready") == ("True", "Reconciled"))
    assert len(events(cluster, "dec", reason)) == 1  # warned once, not on every pass


async def test_unreadable_metrics_keep_the_size(cluster: Cluster, telemetry: TelemetryPage) -> None:
    await create_deployment(cluster, "decode", 3)
    await telemetry.stop()
    await create_policy(cluster, "dec", decode_spec(telemetry, DEPLOYMENT_REF))
    await eventually(
        lambda: condition(cluster, "dec", "ScalingActive") == ("False", "FailedGetMetrics")
    )
    assert policy_status(cluster, "dec")["desiredReplicas"] == 3
    assert cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 3


async def test_an_idle_prefill_pool_scales_down_on_a_ttft_objective(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    # no first token in any window, nothing waiting or running: no demand, not missing data
    telemetry.waiting.labels("prefill", "smollm2").set(0)
    telemetry.running.labels("prefill", "smollm2").set(0)
    await create_deployment(cluster, "prefill", 4)
    spec = {
        **decode_spec(telemetry, {**DEPLOYMENT_REF, "name": "prefill"}),
        "pool": "prefill",
        "objectives": {"ttftP90Ms": 500},
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}},
    }
    await create_policy(cluster, "pre", spec)
    await eventually(lambda: cluster.stored(DEPLOYMENTS, NS, "prefill")["spec"]["replicas"] == 1)
    status = await eventually(
        lambda: (s := policy_status(cluster, "pre")).get("currentReplicas") == 1 and s
    )
    assert status["recommendations"] == [
        {"signal": "ttftP90Ms", "observed": 0, "target": 500, "replicas": 0}
    ]
    assert condition(cluster, "pre", "ScalingActive") == ("True", "ValidMetricFound")
    assert condition(cluster, "pre", "ScalingLimited") == ("True", "TooFewReplicas")


async def test_invalid_spec_is_reported(cluster: Cluster, telemetry: TelemetryPage) -> None:
    # the emulator does not run the CRD's validation, so the operator's own check must hold
    spec = decode_spec(telemetry, DEPLOYMENT_REF, minReplicas=5, maxReplicas=2)
    await create_policy(cluster, "dec", spec)
    await eventually(lambda: condition(cluster, "dec", "AbleToScale") == ("False", "InvalidSpec"))
    messages = {c["type"]: c["message"] for c in policy_status(cluster, "dec")["conditions"]}
    assert messages["Ready"] == "spec: minReplicas must be less than or equal to maxReplicas"
    (warning,) = await eventually(lambda: events(cluster, "dec", "InvalidSpec"))
    assert warning["message"] == messages["Ready"]


async def test_deleting_the_policy_stops_scaling(
    cluster: Cluster, telemetry: TelemetryPage
) -> None:
    waiting = telemetry.waiting.labels("decode", "smollm2")
    waiting.set(8)
    await create_deployment(cluster, "decode", 1)
    await create_policy(cluster, "dec", decode_spec(telemetry, DEPLOYMENT_REF, behavior=UNLIMITED))
    await eventually(lambda: cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 4)
    policy = cluster.stored(CAPACITY_POLICIES, NS, "dec")
    assert policy["metadata"]["finalizers"] == ["baton.dev/capacitypolicy"]

    async with cluster.delete(
        f"/apis/baton.dev/v1alpha1/namespaces/{NS}/capacitypolicies/dec"
    ) as r:
        assert r.status == 200
    await eventually(lambda: not cluster.all_of(CAPACITY_POLICIES))  # kopf let go of its finalizer
    reads = telemetry.requests
    waiting.set(20)  # would ask for 10
    await asyncio.sleep(10 * INTERVAL_S)  # ten timer intervals: time for any stray reconcile
    assert telemetry.requests == reads
    assert cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 4
