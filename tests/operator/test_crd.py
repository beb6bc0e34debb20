"""The CapacityPolicy CRD, as the API server would apply it: every example in the chart
and the docs is admitted, invalid policies are refused with the expected message, and
the operator's pydantic boundary agrees with the CRD on both."""

from __future__ import annotations

import json
import math
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
from tests.operator.invalid_policies import BASE, INVALID

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


def test_status_never_carries_non_finite_numbers() -> None:
    # JSON has no NaN or Infinity: the API server refuses a patch with them (400)
    previous = {"lastMetrics": {"requestsWaiting": 3.0, "itlP90Ms": 80.0}}
    status = PolicyStatus(
        3,
        (Condition(ConditionType.SCALING_ACTIVE, True, "ValidMetricFound", "itlP90Ms"),),
        2,
        4,
        {"itlP90Ms": math.inf, "requestsRunning": math.nan, "requestRate": 1.5},
        (Signal("itlP90Ms", math.inf, 40.0, 4), Signal("queueDepthPerReplica", 3.0, 2.0, 2)),
    ).render(previous, 1_767_225_600.0)
    json.dumps(status, allow_nan=False)  # raises on NaN or Infinity
    # a merge patch: null removes what the previous pass saw and this one did not
    assert status["lastMetrics"] == {"requestsWaiting": None, "itlP90Ms": None, "requestRate": 1.5}
    stored = {**status, "lastMetrics": {"requestRate": 1.5}}
    assert SCHEMA.errors({**BASE, "status": stored}) == []
    assert status["recommendations"] == [
        {"signal": "queueDepthPerReplica", "observed": 3.0, "target": 2.0, "replicas": 2}
    ]
