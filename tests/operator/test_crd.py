"""The CapacityPolicy CRD, as the API server would apply it: every example in the chart
and the docs is admitted, invalid policies are refused with the expected message, and
the operator's pydantic boundary agrees with the CRD on both."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from operators.condition import Condition, ConditionType
from operators.demand import Signal
from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.policy_spec import CapacityPolicySpec
from operators.policy_status import PolicyStatus, last_metrics
from operators.pool_policy import Pool
from tests.operator.crd_schema import CRD_PATH, ROOT, CrdSchema

SCHEMA = CrdSchema.load()
DOC = ROOT / "docs" / "capacitypolicy.md"


def examples() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "charts" / "baton" / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CapacityPolicy":
                found.append((path.name, doc))
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and doc.get("kind") == "CapacityPolicy":
                found.append((f"{DOC.name}#{i}", doc))
    return found


EXAMPLES = examples()


def test_examples_exist_in_chart_and_docs() -> None:
    sources = {name.split("#")[0] for name, _ in EXAMPLES}
    assert DOC.name in sources and len(sources) >= 3, sources


@pytest.mark.parametrize(("source", "policy"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_examples_are_admitted_and_parse_the_same_with_crd_defaults(
    source: str, policy: dict[str, Any]
) -> None:
    assert SCHEMA.errors(policy) == []
    # the operator's boundary agrees with the CRD's defaults: parsing the stored
    # (defaulted) object and the applied one gives the engine the same policy
    applied = CapacityPolicySpec.model_validate(policy["spec"])
    stored = CapacityPolicySpec.model_validate(SCHEMA.defaulted(policy)["spec"])
    assert stored.pool_policy() == applied.pool_policy()


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


@pytest.mark.parametrize(
    ("policy", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_policies_are_refused_with_their_message(
    policy: dict[str, Any], message: str
) -> None:
    assert SCHEMA.errors(policy) == [message]
    # the operator refuses the same spec (clusters may run an older CRD)
    with pytest.raises(ValidationError):
        CapacityPolicySpec.model_validate(policy["spec"])


def test_base_policy_is_admitted() -> None:
    assert SCHEMA.errors(BASE) == []


def test_defaults_are_the_hpa_defaults() -> None:
    spec = SCHEMA.defaulted(BASE)["spec"]
    assert spec["minReplicas"] == 1
    assert spec["behavior"] == {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
                {"type": "Pods", "value": 4, "periodSeconds": 15},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
        },
    }


def test_crd_shape() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["metadata"]["name"] == "capacitypolicies.baton.dev"
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Target", "Pool", "Min", "Max", "Desired", "Current", "Ready", "Age"]
    status = SCHEMA.openapi["properties"]["status"]["properties"]
    assert set(status) >= {
        "observedGeneration",
        "currentReplicas",
        "desiredReplicas",
        "lastMetrics",
        "lastScaleTime",
        "conditions",
    }
    types = status["conditions"]["items"]["properties"]["type"]["enum"]
    assert types == ["Ready", "ScalingActive", "AbleToScale", "ScalingLimited"]


def undocumented(node: dict[str, Any], path: str) -> list[str]:
    missing = [] if "description" in node or path.endswith("metadata") else [path]
    for name, sub in node.get("properties", {}).items():
        missing += undocumented(sub, f"{path}.{name}")
    if "items" in node and node["items"].get("type") == "object":
        missing += undocumented(node["items"], f"{path}[]")
    return missing


def test_every_field_has_a_description() -> None:
    assert undocumented(SCHEMA.openapi, "") == []


def test_structural_every_node_has_a_type() -> None:
    def untyped(node: dict[str, Any], path: str) -> list[str]:
        out = [] if "type" in node else [path]
        for name, sub in node.get("properties", {}).items():
            out += untyped(sub, f"{path}.{name}")
        return out + (untyped(node["items"], f"{path}[]") if "items" in node else [])

    assert untyped(SCHEMA.openapi, "") == []


def test_status_written_by_the_operator_fits_the_schema() -> None:
    status = PolicyStatus(
        3,
        (Condition(ConditionType.SCALING_ACTIVE, True, "ValidMetricFound", "itlP90Ms"),),
        2,
        4,
        last_metrics(
            MetricsWindow(decode=PoolMetrics(itl_p90_s=0.08, requests_waiting=3.0)), Pool.DECODE
        ),
        (Signal("itlP90Ms", 80.0, 40.0, 4),),
        scaled=True,
    ).render({}, 1_767_225_600.0)
    assert SCHEMA.errors({**BASE, "status": status}) == []
    assert status["lastScaleTime"] == "2026-01-01T00:00:00Z"
    assert status["lastMetrics"] == {"itlP90Ms": 80.0, "requestsWaiting": 3.0}
