"""Actuators against the emulated API server: /scale and a RayService's serveConfigV2."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest
import yaml

from operators.kube_api import KubeApi, KubeApiError
from operators.policy_spec import ScaleTargetRef
from operators.scale_target import TargetUnavailable, resolve
from tests.operator.cluster import DEPLOYMENTS, RAYSERVICES, Cluster

NS = "llm"


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[KubeApi]:
    client = KubeApi()
    await client.connect(kopf.ConnectionInfo(server=str(cluster.url)))
    yield client
    await client.close()


def rayservice(config: dict[str, Any] | str) -> dict[str, Any]:
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    return {"metadata": {"name": "llm"}, "spec": {"serveConfigV2": text}}


def serve_config(*apps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"applications": [{"name": f"app{i}", "deployments": d} for i, d in enumerate(apps)]}


RAY_REF = ScaleTargetRef(
    api_version="ray.io/v1", kind="RayService", name="llm", deployment="decode"
)
DEPLOYMENT_REF = ScaleTargetRef(api_version="apps/v1", kind="Deployment", name="decode")


async def test_scale_subresource_reads_and_writes_spec_replicas(
    cluster: Cluster, api: KubeApi
) -> None:
    cluster.objects[DEPLOYMENTS, NS, "decode"] = {
        "metadata": {"name": "decode", "namespace": NS},
        "spec": {"replicas": 3, "template": {"spec": {"containers": []}}},
    }
    target = await resolve(api, DEPLOYMENT_REF, NS)
    assert await target.replicas() == 3
    await target.resize(5)
    stored = cluster.stored(DEPLOYMENTS, NS, "decode")
    assert stored["spec"] == {"replicas": 5, "template": {"spec": {"containers": []}}}
    (patch,) = list(cluster["patch"])
    assert str(patch.url.path).endswith("/deployments/decode/scale")
    assert patch.data == {"spec": {"replicas": 5}}


async def test_rayservice_changes_only_its_deployment(cluster: Cluster, api: KubeApi) -> None:
    config = serve_config(
        [{"name": "router", "num_replicas": 1}, {"name": "prefill", "num_replicas": 2}],
        [{"name": "decode", "num_replicas": 3, "max_ongoing_requests": 64}],
    )
    cluster.objects[RAYSERVICES, NS, "llm"] = {
        **rayservice(config),
        "metadata": {"name": "llm", "namespace": NS, "resourceVersion": "41"},
    }
    target = await resolve(api, RAY_REF, NS)
    assert await target.replicas() == 3
    await target.resize(6)
    written = yaml.safe_load(cluster.stored(RAYSERVICES, NS, "llm")["spec"]["serveConfigV2"])
    config["applications"][1]["deployments"][0]["num_replicas"] = 6
    assert written == config
    (patch,) = list(cluster["patch"])
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert patch.data["metadata"]["resourceVersion"] == "41"  # a concurrent edit conflicts


async def test_rayservice_without_num_replicas_counts_one(cluster: Cluster, api: KubeApi) -> None:
    cluster.objects[RAYSERVICES, NS, "llm"] = rayservice(serve_config([{"name": "decode"}]))
    assert await (await resolve(api, RAY_REF, NS)).replicas() == 1


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (serve_config([{"name": "prefill", "num_replicas": 1}]), "DeploymentNotFound"),
        (serve_config([{"name": "decode"}], [{"name": "decode"}]), "DeploymentNotFound"),
        (serve_config([{"name": "decode", "num_replicas": "auto"}]), "ServeAutoscalingEnabled"),
        (
            serve_config([{"name": "decode", "autoscaling_config": {"max_replicas": 4}}]),
            "ServeAutoscalingEnabled",
        ),
        ("applications: [", "InvalidServeConfig"),
        ("just text", "InvalidServeConfig"),
        ("applications:\n- baton\n", "InvalidServeConfig"),  # names, not maps
        ("applications: {baton: {}}\n", "InvalidServeConfig"),
        ({"applications": [{"name": "a", "deployments": ["decode"]}]}, "InvalidServeConfig"),
        (serve_config([{"name": "decode", "num_replicas": None}]), "InvalidServeConfig"),
        (serve_config([{"name": "decode", "num_replicas": "two"}]), "InvalidServeConfig"),
        (serve_config([{"name": "decode", "num_replicas": [1]}]), "InvalidServeConfig"),
        (serve_config([{"name": "decode", "num_replicas": True}]), "InvalidServeConfig"),
        (serve_config([{"name": "decode", "num_replicas": -1}]), "InvalidServeConfig"),
    ],
)
async def test_rayservice_problems_are_reasons(
    cluster: Cluster, api: KubeApi, config: dict[str, Any] | str, reason: str
) -> None:
    cluster.objects[RAYSERVICES, NS, "llm"] = rayservice(config)
    target = await resolve(api, RAY_REF, NS)
    with pytest.raises(TargetUnavailable) as e:
        await target.replicas()
    assert e.value.reason == reason
    assert e.value.message.startswith("RayService llm/llm deployment decode: ")


async def test_bad_num_replicas_is_named_in_the_message(cluster: Cluster, api: KubeApi) -> None:
    config = serve_config([{"name": "prefill"}], [{"name": "decode", "num_replicas": "two"}])
    cluster.objects[RAYSERVICES, NS, "llm"] = rayservice(config)
    with pytest.raises(TargetUnavailable) as e:
        await (await resolve(api, RAY_REF, NS)).replicas()
    assert e.value.message == (
        "RayService llm/llm deployment decode: applications[1].deployments[0].num_replicas "
        "is 'two', not a replica count (an integer of at least 0)"
    )


async def test_missing_targets(cluster: Cluster, api: KubeApi) -> None:
    with pytest.raises(TargetUnavailable) as e:
        await (await resolve(api, DEPLOYMENT_REF, NS)).replicas()
    assert e.value.reason == "TargetNotFound"
    widget = ScaleTargetRef(api_version="example.com/v1", kind="Widget", name="w")
    with pytest.raises(TargetUnavailable) as e:
        await resolve(api, widget, NS)
    assert e.value.reason == "FailedGetScale"
    assert "the server has no Widget in example.com/v1" in e.value.message


async def test_transient_errors_are_raised_for_a_retry(cluster: Cluster, api: KubeApi) -> None:
    cluster["get /apis/apps/v1"] << 503  # discovery
    with pytest.raises(KubeApiError) as e:
        await resolve(api, DEPLOYMENT_REF, NS)
    assert e.value.status == 503 and e.value.transient
    cluster["patch", kmock.resource(RAYSERVICES)] << 409
    cluster.objects[RAYSERVICES, NS, "llm"] = rayservice(serve_config([{"name": "decode"}]))
    target = await resolve(api, RAY_REF, NS)
    await target.replicas()
    with pytest.raises(KubeApiError) as e:
        await target.resize(2)
    assert e.value.status == 409 and e.value.transient


async def test_forbidden_is_not_transient(cluster: Cluster, api: KubeApi) -> None:
    cluster["patch", kmock.resource(DEPLOYMENTS), kmock.subresource("scale")] << 403
    cluster.objects[DEPLOYMENTS, NS, "decode"] = {"metadata": {"name": "decode"}, "spec": {}}
    target = await resolve(api, DEPLOYMENT_REF, NS)
    with pytest.raises(TargetUnavailable) as e:
        await target.resize(2)
    assert e.value.reason == "FailedUpdateScale"


async def test_no_login_no_requests() -> None:
    with pytest.raises(KubeApiError, match="NotLoggedIn"):
        await KubeApi().get("/api/v1")
