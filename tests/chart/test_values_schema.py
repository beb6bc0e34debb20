"""`helm install` refuses bad values with a message that names the field and the limit:
values.schema.json for single values, the chart's `fail` checks for rules across values."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.chart.chart import render_values
from tests.chart.test_render import admission_errors

SCHEMA_ERRORS = [
    (
        {"pools": {"decode": {"replicas": -1}}},
        "at '/pools/decode/replicas': minimum: got -1, want 0",
    ),
    (
        {"pools": {"prefill": {"minReplicas": -3}}},
        "at '/pools/prefill/minReplicas': minimum: got -3, want 1",
    ),
    ({"router": {"replicas": -2}}, "at '/router/replicas': minimum: got -2, want 1"),
    ({"kvstore": {"shards": 0}}, "at '/kvstore/shards': minimum: got 0, want 1"),
    (
        {"pools": {"prefill": {"replicas": 0}}},
        "at '/pools/prefill/replicas': minimum: got 0, want 1",
    ),
    (
        {"pools": {"decode": {"replicas": 0}}},
        "at '/pools/decode/replicas': minimum: got 0, want 1",
    ),
    (
        {"pools": {"embed": {"replicas": 1, "linear": "dense"}}},
        "at '/pools': additional properties 'embed' not allowed",
    ),
    ({"model": None}, "at '': missing property 'model'"),
    ({"model": {"servedName": ""}}, "at '/model/servedName': minLength: got 0, want 1"),
    ({"model": {"servedName": None}}, "at '/model': missing property 'servedName'"),
    (
        {"model": {"device": "tpu"}},
        "at '/model/device': 'tpu' does not match pattern '^(cpu|cuda(:[0-9]+)?)$'",
    ),
    (
        {"pools": {"decode": {"linear": "int3"}}},
        "at '/pools/decode/linear': value must be one of 'dense', 'fp8', 'int4'",
    ),
    (
        {"kvstore": {"resources": {"limits": {"memory": "lots"}}}},
        "at '/kvstore/resources/limits/memory': 'lots' does not match pattern",
    ),
    (
        {"kvstore": {"resources": {"requests": {"cpu": "1"}, "limits": None}}},
        "at '/kvstore/resources': missing property 'limits'",
    ),
    ({"mode": "split"}, "at '/mode': value must be one of 'disaggregated', 'colocated'"),
    ({"replicas": 3}, "at '': additional properties 'replicas' not allowed"),
    (
        {"pools": {"decode": {"resources": {"requests": {"cpu": "lots"}}}}},
        "at '/pools/decode/resources/requests/cpu': 'lots' does not match pattern",
    ),
    (
        {"router": {"resources": {"requests": {"cpu": -1}}}},
        "at '/router/resources/requests/cpu': minimum: got -1, want 0",
    ),
    (
        {"operator": {"resources": {"limits": {"cpu": "-500m"}}}},
        "at '/operator/resources/limits/cpu': '-500m' does not match pattern",
    ),
    (
        # 512 millibytes: a valid quantity the kubelet rounds to a 1-byte limit.
        {"ray": {"head": {"resources": {"limits": {"memory": "512m"}}}}},
        "at '/ray/head/resources/limits/memory': '512m' does not match pattern",
    ),
    (
        {"pools": {"prefill": {"resources": {"limits": {"ephemeral-storage": "-1Gi"}}}}},
        "at '/pools/prefill/resources/limits/ephemeral-storage': '-1Gi' does not match pattern",
    ),
    (
        {"pools": {"prefill": {"resources": {"limits": {"nvidia.com/gpu": 0.5}}}}},
        "at '/pools/prefill/resources/limits/nvidia.com~1gpu': got number, want integer or string",
    ),
    (
        {"router": {"resources": {"requests": {"cpus": "2"}}}},
        "at '/router/resources/requests': additional properties 'cpus' not allowed",
    ),
    (
        {"operator": {"watchNamespaces": ["Team A"]}},
        "at '/operator/watchNamespaces/0': 'Team A' does not match pattern",
    ),
    (
        {"commonLabels": {"team": "ml platform!"}},
        "at '/commonLabels/team': 'ml platform!' does not match pattern",
    ),
    (
        {"commonLabels": {"team": "x" * 64}},
        "at '/commonLabels/team': maxLength: got 64, want 63",
    ),
    (
        {"podLabels": {"bad key": "x"}},
        # Helm's validator reports a bad key at the root, not at its map.
        "invalid propertyName 'bad key'",
    ),
]


@pytest.mark.parametrize(("values", "message"), SCHEMA_ERRORS)
def test_schema_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        render_values(values)
    assert "values don't meet the specifications of the schema(s)" in str(raised.value)
    assert message in str(raised.value)


TEMPLATE_ERRORS = [
    (
        {"pools": {"decode": {"replicas": 9}}},
        "pools.decode.replicas (9) must lie within minReplicas (1) and maxReplicas (8)",
    ),
    (
        {"kvstore": {"shards": 3}, "redis": {"enabled": False}},
        "kvstore.shards > 1 needs a prefix index the shards share: set redis.enabled, "
        "redis.external.url or redis.external.existingSecret",
    ),
    (
        {"inferencePool": {"enabled": True}},
        "inferencePool.enabled needs inferencePool.endpointPicker.name",
    ),
    (
        {"router": {"httpPort": 50051}},
        "router.httpPort and router.grpcPort are both 50051: the router Service needs two ports",
    ),
    (
        {"kvstore": {"metricsPort": 50052}},
        "kvstore.port and kvstore.metricsPort are both 50052: the KV store Service needs two ports",
    ),
    (
        {"model": {"mountPath": "/tmp", "volume": {"emptyDir": {}}}},
        "model.mountPath (/tmp) is already mounted in the Ray pods: use a path other than "
        "/dev/shm, /tmp and /etc/baton/kvstore-token",
    ),
    (
        {"model": {"mountPath": "/dev/shm/", "volume": {"emptyDir": {}}}},
        "model.mountPath (/dev/shm/) is already mounted in the Ray pods",
    ),
    (
        {"ray": {"autoscaler": {"enabled": False}}},
        "ray.autoscaler.enabled is false, so the worker group of pools.prefill stays at "
        "replicas (1) pods, but the operator may raise its Serve replicas to maxReplicas (4), "
        "which could never be placed: enable ray.autoscaler, set pools.prefill.replicas to "
        "maxReplicas (a fixed-size group), or set pools.prefill.capacityPolicy.enabled=false",
    ),
    (
        {"router": {"podDisruptionBudget": {"enabled": True, "minAvailable": 5}}},
        "router.podDisruptionBudget.minAvailable (5) must be less than router.replicas (1): "
        "otherwise no router pod can ever be evicted and node drains hang",
    ),
    (
        {
            "pools": {
                "decode": {
                    "minReplicas": 2,
                    "replicas": 3,
                    "podDisruptionBudget": {"minAvailable": 2},
                }
            }
        },
        "pools.decode.podDisruptionBudget.minAvailable (2) must be less than "
        "pools.decode.minReplicas (2): otherwise no decode pod can be evicted once the pool is "
        "at minReplicas and node drains hang",
    ),
]


@pytest.mark.parametrize(("values", "message"), TEMPLATE_ERRORS)
def test_chart_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        render_values(values)
    assert message in str(raised.value)


def test_kubernetes_quantities_are_accepted() -> None:
    """The quantity patterns refuse no form the API server takes for these resources."""
    quantities = {
        "cpu": "1.5",
        "memory": "1e9",
        "ephemeral-storage": "10G",
        "hugepages-2Mi": "64Mi",
        "nvidia.com/gpu": 1,
    }
    values = {"requests": {**quantities, "cpu": 0.25, "memory": 2**30}, "limits": quantities}
    release = render_values({"pools": {"decode": {"resources": values}}})
    (decode,) = release.worker_group("decode")["template"]["spec"]["containers"]
    assert decode["resources"]["limits"] == quantities
    assert admission_errors(release.rayservice) == []


def test_fixed_size_pools_need_no_autoscaler() -> None:
    """Without Ray's autoscaler a pool works when its worker group already holds every
    replica the operator may ask for, or when no policy sizes it."""
    values = {
        "ray": {"autoscaler": {"enabled": False}},
        "pools": {
            "prefill": {"replicas": 4},
            "decode": {"capacityPolicy": {"enabled": False}},
        },
    }
    groups = render_values(values).rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [(g["groupName"], g["replicas"]) for g in groups] == [
        ("router", 1),
        ("prefill", 4),
        ("decode", 1),
    ]
    render_values({"ray": {"autoscaler": {"enabled": False}}, "operator": {"enabled": False}})


def test_colocated_mode_takes_no_prefill_replicas() -> None:
    """Only disaggregated mode needs a prefill pool; the schema's rule follows the mode."""
    release = render_values({"mode": "colocated", "pools": {"prefill": {"replicas": 0}}})
    assert release.serving_config["prefill"]["replicas"] == 0
