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
    # KubeRay deploys the Serve applications through the head's dashboard
    (
        {"ray": {"head": {"rayStartParams": {"include-dashboard": "false"}}}},
        "at '/ray/head/rayStartParams/include-dashboard': 'false' does not match pattern",
    ),
    (
        {"router": {"readinessProbe": {"periodSeconds": 0}}},
        "at '/router/readinessProbe/periodSeconds': minimum: got 0, want 1",
    ),
    # Kubernetes requires successThreshold 1 of a liveness or startup probe.
    (
        {"kvstore": {"livenessProbe": {"successThreshold": 2}}},
        "at '/kvstore/livenessProbe': additional properties 'successThreshold' not allowed",
    ),
    # The values give a probe's thresholds; its check is the chart's.
    (
        {"operator": {"startupProbe": {"exec": {"command": ["true"]}}}},
        "at '/operator/startupProbe': additional properties 'exec' not allowed",
    ),
    (
        {"kvstore": {"readinessProbe": {"timeoutSeconds": "5s"}}},
        "at '/kvstore/readinessProbe/timeoutSeconds': got string, want integer",
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
        {"pools": {"decode": {"kvCacheDtype": "fp8"}}},
        "pools.prefill.kvCacheDtype (auto) and pools.decode.kvCacheDtype (fp8) differ: decode "
        "reads the KV blocks prefill writes, so both pools must cache KV alike",
    ),
    (
        {"router": {"httpPort": 50051}},
        "router.httpPort (50051) and router.grpcPort (50051) clash in the Ray worker pods: "
        "each needs a port of its own",
    ),
    (
        {"kvstore": {"metricsPort": 50052}},
        "kvstore.port (50052) and kvstore.metricsPort (50052) clash in the KV store pods: "
        "each needs a port of its own",
    ),
    # Serve's proxy binds router.httpPort in every Ray pod, the head's included
    (
        {"router": {"httpPort": 8265}},
        "router.httpPort (8265) and Ray's dashboard, ray.head.rayStartParams.dashboard-port "
        "(8265) clash in the Ray head pod",
    ),
    (
        {"router": {"httpPort": 6379}},
        "router.httpPort (6379) and Ray's GCS server, ray.head.rayStartParams.port (6379) "
        "clash in the Ray head pod",
    ),
    (
        {"router": {"httpPort": 10001}},
        "router.httpPort (10001) and Ray's client server, "
        "ray.head.rayStartParams.ray-client-server-port (10001) clash in the Ray head pod",
    ),
    (
        {"router": {"httpPort": 9000}, "ray": {"head": {"rayStartParams": {"port": "9000"}}}},
        "router.httpPort (9000) and Ray's GCS server, ray.head.rayStartParams.port (9000) "
        "clash in the Ray head pod",
    ),
    (
        {"ray": {"head": {"rayStartParams": {"node-manager-port": "8000"}}}},
        "router.httpPort (8000) and Ray's node manager, "
        "ray.head.rayStartParams.node-manager-port (8000) clash in the Ray head pod",
    ),
    (
        {"ray": {"head": {"rayStartParams": {"min-worker-port": "7000"}}}},
        "router.httpPort (8000) and Ray's worker ports, ray.head.rayStartParams.min-worker-port "
        "to ray.head.rayStartParams.max-worker-port (7000-19999) clash in the Ray head pod",
    ),
    # router.grpcPort is bound in the router's worker pods, where KubeRay and Ray add theirs
    (
        {"router": {"grpcPort": 52365}},
        "router.grpcPort (52365) and Ray's dashboard agent, "
        "ray start --dashboard-agent-listen-port (52365) clash in the Ray worker pods",
    ),
    (
        {"router": {"grpcPort": 8080}},
        "router.grpcPort (8080) and Ray's metrics export port, "
        "ray start --metrics-export-port (8080) clash in the Ray worker pods",
    ),
    (
        {"router": {"grpcPort": 19999}},
        "router.grpcPort (19999) and Ray's worker ports, ray start --min-worker-port to "
        "ray start --max-worker-port (10002-19999) clash in the Ray worker pods",
    ),
    (
        {"pools": {"prefill": {"resources": {"limits": {"memory": "1.5Gi"}}}}},
        "pools.prefill.resources.requests.memory (4Gi) must not exceed "
        "pools.prefill.resources.limits.memory (1.5Gi): Kubernetes refuses a pod that requests "
        "more than its limit",
    ),
    (
        {
            "pools": {
                "decode": {
                    "resources": {"requests": {"memory": "1600Mi"}, "limits": {"memory": "1.5Gi"}}
                }
            }
        },
        "pools.decode.resources.requests.memory (1600Mi) must not exceed "
        "pools.decode.resources.limits.memory (1.5Gi)",
    ),
    (
        {"router": {"resources": {"requests": {"cpu": "1500m"}, "limits": {"cpu": 1}}}},
        "router.resources.requests.cpu (1500m) must not exceed router.resources.limits.cpu (1)",
    ),
    (
        {"ray": {"head": {"resources": {"limits": {"cpu": "0.5"}}}}},
        "ray.head.resources.requests.cpu (1) must not exceed ray.head.resources.limits.cpu (0.5)",
    ),
    (
        {"kvstore": {"resources": {"requests": {"memory": "5e9"}}}},
        "kvstore.resources.requests.memory (5e9) must not exceed "
        "kvstore.resources.limits.memory (4Gi)",
    ),
    (
        {"redis": {"resources": {"requests": {"memory": "1G"}}}},
        "redis.resources.requests.memory (1G) must not exceed "
        "redis.resources.limits.memory (512Mi)",
    ),
    (
        {"operator": {"resources": {"limits": {"cpu": "50m"}}}},
        "operator.resources.requests.cpu (100m) must not exceed "
        "operator.resources.limits.cpu (50m)",
    ),
    # Kubernetes cannot overcommit extended resources (nor hugepages): request == limit
    (
        {"pools": {"decode": {"gpus": 1, "resources": {"requests": {"nvidia.com/gpu": 2}}}}},
        "pools.decode.resources.requests.nvidia.com/gpu (2) must equal pools.decode.gpus (1): "
        "Kubernetes cannot overcommit nvidia.com/gpu, so it refuses a pod whose request differs "
        "from its limit; leave the request out and it defaults to the limit",
    ),
    (
        {
            "router": {
                "resources": {
                    "requests": {"example.com/fpga": 1},
                    "limits": {"example.com/fpga": "2"},
                }
            }
        },
        "router.resources.requests.example.com/fpga (1) must equal "
        "router.resources.limits.example.com/fpga (2)",
    ),
    (
        {
            "ray": {
                "head": {
                    "resources": {
                        "requests": {"hugepages-2Mi": "64Mi"},
                        "limits": {"hugepages-2Mi": "128Mi"},
                    }
                }
            }
        },
        "ray.head.resources.requests.hugepages-2Mi (64Mi) must equal "
        "ray.head.resources.limits.hugepages-2Mi (128Mi)",
    ),
    (
        {"pools": {"prefill": {"resources": {"requests": {"nvidia.com/gpu": 1}}}}},
        "pools.prefill.resources.requests.nvidia.com/gpu (1) needs a limit, "
        "pools.prefill.resources.limits.nvidia.com/gpu: Kubernetes cannot overcommit "
        "nvidia.com/gpu, so it refuses a request without a limit; set the limit alone and the "
        "request defaults to it",
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
    requests = {**quantities, "cpu": 0.25, "memory": 2**29}  # at most the limits, as numbers
    values = {"requests": requests, "limits": quantities}
    release = render_values({"pools": {"decode": {"resources": values}}})
    (decode,) = release.worker_group("decode")["template"]["spec"]["containers"]
    assert decode["resources"]["limits"] == quantities
    assert admission_errors(release.rayservice) == []


def test_requests_up_to_their_limits_are_accepted() -> None:
    """Quantities compare by amount, not by how they are written."""
    resources = {
        "requests": {"cpu": "1500m", "memory": "1Gi", "ephemeral-storage": "1G"},
        "limits": {"cpu": 1.5, "memory": "1500Mi", "ephemeral-storage": "1e9"},
    }
    release = render_values({"pools": {"decode": {"resources": resources}}})
    (decode,) = release.worker_group("decode")["template"]["spec"]["containers"]
    assert decode["resources"] == resources


def test_extended_resources_requested_as_limited_are_accepted() -> None:
    """An extended resource's request may be given when it equals the limit, here the one
    pools.decode.gpus sets, however the two are written."""
    resources = {"requests": {"nvidia.com/gpu": "2"}}
    release = render_values({"pools": {"decode": {"gpus": 2, "resources": resources}}})
    (decode,) = release.worker_group("decode")["template"]["spec"]["containers"]
    assert decode["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert decode["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert admission_errors(release.rayservice) == []


def test_ports_apart_from_rays_are_accepted() -> None:
    """Ray's ports are where it binds them: the head's flags move the head's, and the head's
    GCS port is free in the worker pods, where only the router's gRPC server binds."""
    values = {
        "router": {"httpPort": 8265, "grpcPort": 6379},
        "ray": {"head": {"rayStartParams": {"dashboard-port": "8267"}}},
    }
    release = render_values(values)
    assert release.serve_config["http_options"]["port"] == 8265
    head = release.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-port"] == "8267"
    # The head declares its ports where Ray binds them: KubeRay finds the dashboard there.
    (container,) = head["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "gcs-server": 6379,
        "dashboard": 8267,
        "client": 10001,
        "metrics": 8080,
        "serve": 8265,
    }


def test_the_dashboard_may_be_switched_on_in_rays_spellings() -> None:
    """`include-dashboard` takes what `ray start` reads as true; only off is refused."""
    for on in ("true", "True", "1", "yes"):
        release = render_values({"ray": {"head": {"rayStartParams": {"include-dashboard": on}}}})
        head = release.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert head["rayStartParams"]["include-dashboard"] == on


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
