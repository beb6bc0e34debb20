"""Invalid CapacityPolicies and the message the API server gives for each: what the
CRD test feeds to the schema and the CEL rules (and to the operator's own validation)."""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "apiVersion": "baton.dev/v1alpha1",
    "kind": "CapacityPolicy",
    "metadata": {"name": "p", "namespace": "llm"},
    "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "decode"},
        "pool": "decode",
        "maxReplicas": 4,
        "objectives": {"itlP90Ms": 50},
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    """BASE with `spec` keys replaced; a dotted key reaches into nested maps, None deletes."""
    policy = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = policy["spec"]
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return policy


RAY = {"apiVersion": "ray.io/v1", "kind": "RayService", "name": "llm"}
INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "min-over-max",
        with_spec(minReplicas=5),
        "spec: minReplicas must be less than or equal to maxReplicas",
    ),
    (
        "unknown-pool",
        with_spec(pool="batch"),
        "spec.pool: 'batch' is not one of ['prefill', 'decode']",
    ),
    ("no-max", with_spec(maxReplicas=None), "spec: 'maxReplicas' is a required property"),
    ("zero-min", with_spec(minReplicas=0), "spec.minReplicas: 0 is less than the minimum of 1"),
    (
        "rayservice-without-deployment",
        with_spec(scaleTargetRef=RAY),
        "spec.scaleTargetRef: scaleTargetRef.deployment is required when kind is RayService",
    ),
    (
        "deployment-on-deployment",
        with_spec(scaleTargetRef__deployment="decode"),
        "spec.scaleTargetRef: scaleTargetRef.deployment applies only to a RayService target",
    ),
    (
        "ttft-on-decode",
        with_spec(objectives__ttftP90Ms=500),
        "spec: objectives.ttftP90Ms applies to the prefill pool only",
    ),
    (
        "itl-on-prefill",
        with_spec(pool="prefill"),
        "spec: objectives.itlP90Ms and objectives.kvCacheUtilization apply to the decode pool only",
    ),
    (
        "sequences-on-prefill",
        with_spec(
            pool="prefill", objectives={"ttftP90Ms": 500}, capacity={"sequencesPerReplica": 8}
        ),
        "spec: capacity.sequencesPerReplica applies to the decode pool only",
    ),
    (
        "nothing-drives-scaling",
        with_spec(objectives={}),
        "spec: set at least one objective or capacity hint: nothing would drive scaling",
    ),
    (
        "kv-over-one",
        with_spec(objectives__kvCacheUtilization=1.5),
        "spec.objectives.kvCacheUtilization: 1.5 is greater than the maximum of 1",
    ),
    (
        "kv-zero",
        with_spec(objectives__kvCacheUtilization=0),
        "spec.objectives.kvCacheUtilization: 0 is less than or equal to the minimum of 0",
    ),
    (
        "policy-type",
        with_spec(
            behavior={
                "scaleUp": {"policies": [{"type": "Replicas", "value": 1, "periodSeconds": 15}]}
            }
        ),
        "spec.behavior.scaleUp.policies.0.type: 'Replicas' is not one of ['Pods', 'Percent']",
    ),
    (
        "long-period",
        with_spec(
            behavior={
                "scaleDown": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 3600}]}
            }
        ),
        "spec.behavior.scaleDown.policies.0.periodSeconds: "
        "3600 is greater than the maximum of 1800",
    ),
    (
        "long-window",
        with_spec(behavior={"scaleDown": {"stabilizationWindowSeconds": 7200}}),
        "spec.behavior.scaleDown.stabilizationWindowSeconds: "
        "7200 is greater than the maximum of 3600",
    ),
    (
        "select-policy",
        with_spec(behavior={"scaleUp": {"selectPolicy": "Average"}}),
        "spec.behavior.scaleUp.selectPolicy: 'Average' is not one of ['Max', 'Min', 'Disabled']",
    ),
    (
        "empty-policies",
        with_spec(behavior={"scaleUp": {"policies": []}}),
        "spec.behavior.scaleUp: "
        "behavior policies must not be empty unless selectPolicy is Disabled",
    ),
    (
        "scale-down-over-100",
        with_spec(
            behavior={
                "scaleDown": {"policies": [{"type": "Percent", "value": 150, "periodSeconds": 60}]}
            }
        ),
        "spec.behavior.scaleDown: behavior.scaleDown: a Percent policy cannot exceed 100",
    ),
    (
        "prometheus-missing",
        with_spec(metrics={"source": "prometheus"}),
        "spec.metrics: metrics.prometheus is required when metrics.source is prometheus",
    ),
    (
        "scrape-missing",
        with_spec(metrics={"source": "scrape"}),
        "spec.metrics: metrics.scrape is required when metrics.source is scrape",
    ),
    (
        "prometheus-not-url",
        with_spec(metrics={"source": "prometheus", "prometheus": {"url": "prometheus:9090"}}),
        "spec.metrics.prometheus.url: metrics.prometheus.url must be an http(s) URL",
    ),
    (
        "scrape-not-url",
        with_spec(metrics={"source": "scrape", "scrape": {"endpoints": ["decode-0:8000/metrics"]}}),
        "spec.metrics.scrape.endpoints[0]: metrics.scrape.endpoints must be http(s) URLs",
    ),
    (
        "no-endpoints",
        with_spec(metrics={"source": "scrape", "scrape": {"endpoints": []}}),
        "spec.metrics.scrape.endpoints: [] should be non-empty",
    ),
    (
        "unknown-field",
        with_spec(replicas=3),
        "spec: Additional properties are not allowed ('replicas' was unexpected)",
    ),
]
