"""A pool's `capacityPolicy` values are checked at `helm install` as the API server checks
the CapacityPolicy they become: the CRD's schema (derived into values.schema.json, unknown
fields refused rather than pruned) and every CEL rule (a `fail` of the chart)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.chart.chart import FULLNAME, render_values
from tests.chart.policy_schema import (
    POLICY_FIELDS,
    VALUES_SCHEMA,
    crd_spec,
    derived_policy_schema,
    pattern_rule,
)
from tests.chart.test_render import admission_errors


def test_values_schema_is_derived_from_the_crd() -> None:
    schema = json.loads(VALUES_SCHEMA.read_text())
    assert schema["definitions"]["capacityPolicySpec"] == derived_policy_schema(), (
        "values.schema.json is stale: run `python -m tests.chart.policy_schema`"
    )
    spec = crd_spec()["properties"]
    pool = schema["definitions"]["pool"]["properties"]
    for bound in ("minReplicas", "maxReplicas"):
        assert (pool[bound]["minimum"], pool[bound]["maximum"]) == (
            spec[bound]["minimum"],
            spec[bound]["maximum"],
        )
    model = schema["properties"]["model"]["properties"]["servedName"]
    assert model["maxLength"] == spec["model"]["maxLength"]


def _pool(name: str, **policy: Any) -> dict[str, Any]:
    return {"pools": {name: {"capacityPolicy": policy}}}


# One bad value per field: each is refused by the schema, none pruned by the API server.
SCHEMA_ERRORS = [
    (
        _pool("prefill", objectives={"ttftP90ms": 500}),
        "at '/pools/prefill/capacityPolicy/objectives': additional properties 'ttftP90ms'",
    ),
    (
        _pool("decode", capacity={"sequencesPerReplicas": 8}),
        "at '/pools/decode/capacityPolicy/capacity': additional properties 'sequencesPerReplicas'",
    ),
    (
        _pool("decode", behavior={"scaleDown": {"stabilizationWindow": 60}}),
        "at '/pools/decode/capacityPolicy/behavior/scaleDown': additional properties "
        "'stabilizationWindow'",
    ),
    (
        _pool("decode", metrics={"source": "scrape", "scrape": {"endpoint": ["http://a"]}}),
        "at '/pools/decode/capacityPolicy/metrics/scrape': additional properties 'endpoint'",
    ),
    (
        _pool("decode", metrics={"scrape": {"endpoints": ["http://a/metrics"]}}),
        "at '/pools/decode/capacityPolicy/metrics': missing property 'source'",
    ),
    (
        _pool("decode", objectives={"kvCacheUtilization": 80}),
        "at '/pools/decode/capacityPolicy/objectives/kvCacheUtilization': maximum: got 80, want 1",
    ),
    (
        _pool("decode", metrics={"source": "scrape", "scrape": {"endpoints": ["router:8000"]}}),
        "at '/pools/decode/capacityPolicy/metrics/scrape/endpoints/0': 'router:8000' does not "
        "match pattern '^https?://'",
    ),
    (
        {"pools": {"decode": {"maxReplicas": 20000}}},
        "at '/pools/decode/maxReplicas': maximum: got 20,000, want 10,000",
    ),
]


@pytest.mark.parametrize(("values", "message"), SCHEMA_ERRORS)
def test_schema_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        render_values(values)
    assert message in str(raised.value)


def _cel_rules(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, str]]:
    """(where, message) of every CEL rule of the CRD's spec that a schema cannot state."""
    for rule in node.get("x-kubernetes-validations", []):
        if pattern_rule(rule) is None:
            yield path, rule["message"]
    for name, child in node.get("properties", {}).items():
        if name != "scaleTargetRef":  # the chart's own, not a value
            yield from _cel_rules(child, f"{path}.{name}".lstrip("."))
    if "items" in node:
        yield from _cel_rules(node["items"], path)


_PODS_STEP = {"type": "Pods", "value": 1, "periodSeconds": 15}
# The CRD's CEL rules, keyed by (where, message), each with values breaking it and the
# chart's message for them.
RULE_VIOLATIONS: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("", "minReplicas must be less than or equal to maxReplicas"): (
        {"pools": {"decode": {"minReplicas": 5, "maxReplicas": 3}}},
        "pools.decode.minReplicas (5) must be less than or equal to maxReplicas (3)",
    ),
    ("", "objectives.ttftP90Ms applies to the prefill pool only"): (
        _pool("decode", objectives={"ttftP90Ms": 500}),
        "pools.decode.capacityPolicy: objectives.ttftP90Ms applies to the prefill pool only",
    ),
    ("", "objectives.itlP90Ms and objectives.kvCacheUtilization apply to the decode pool only"): (
        _pool("prefill", objectives={"itlP90Ms": 40}),
        "pools.prefill.capacityPolicy: objectives.itlP90Ms and objectives.kvCacheUtilization "
        "apply to the decode pool only",
    ),
    ("", "capacity.sequencesPerReplica applies to the decode pool only"): (
        _pool("prefill", capacity={"sequencesPerReplica": 8}),
        "pools.prefill.capacityPolicy: capacity.sequencesPerReplica applies to the decode "
        "pool only",
    ),
    ("", "set at least one objective or capacity hint: nothing would drive scaling"): (
        _pool("decode", objectives={"kvCacheUtilization": None, "queueDepthPerReplica": None}),
        "pools.decode.capacityPolicy: set at least one objective or capacity hint: nothing "
        "would drive scaling",
    ),
    ("metrics", "metrics.prometheus is required when metrics.source is prometheus"): (
        _pool("decode", metrics={"source": "prometheus"}),
        "pools.decode.capacityPolicy: metrics.prometheus is required when metrics.source is "
        "prometheus",
    ),
    ("metrics", "metrics.scrape is required when metrics.source is scrape"): (
        _pool("prefill", metrics={"source": "scrape"}),
        "pools.prefill.capacityPolicy: metrics.scrape is required when metrics.source is scrape",
    ),
    ("behavior.scaleUp", "behavior policies must not be empty unless selectPolicy is Disabled"): (
        _pool("decode", behavior={"scaleUp": {"policies": []}}),
        "pools.decode.capacityPolicy: behavior.scaleUp.policies must not be empty unless "
        "selectPolicy is Disabled",
    ),
    (
        "behavior.scaleDown",
        "behavior policies must not be empty unless selectPolicy is Disabled",
    ): (
        _pool("decode", behavior={"scaleDown": {"selectPolicy": "Min", "policies": []}}),
        "pools.decode.capacityPolicy: behavior.scaleDown.policies must not be empty unless "
        "selectPolicy is Disabled",
    ),
    ("behavior.scaleDown", "behavior.scaleDown: a Percent policy cannot exceed 100"): (
        _pool(
            "decode",
            behavior={
                "scaleDown": {
                    "policies": [_PODS_STEP, {**_PODS_STEP, "type": "Percent", "value": 200}]
                }
            },
        ),
        "pools.decode.capacityPolicy: behavior.scaleDown.policies[1]: a Percent policy cannot "
        "exceed 100 (got 200)",
    ),
}


def test_every_crd_rule_has_a_chart_check() -> None:
    assert sorted(_cel_rules(crd_spec())) == sorted(RULE_VIOLATIONS)


@pytest.mark.parametrize(("values", "message"), list(RULE_VIOLATIONS.values()))
def test_chart_refuses_what_the_crd_rules_refuse(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        render_values(values)
    assert message in str(raised.value)


def test_every_policy_field_reaches_the_capacity_policy() -> None:
    """The schema and checks refuse no valid policy: all four fields, both pools, admitted."""
    decode = {
        "objectives": {"itlP90Ms": 50},
        "capacity": {"sequencesPerReplica": 32, "tokensPerSecondPerReplica": 2000},
        "behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 30, "policies": [_PODS_STEP]},
            "scaleDown": {"selectPolicy": "Disabled", "policies": []},
        },
        "metrics": {
            "source": "prometheus",
            "prometheus": {"url": "http://prom:9090", "selector": 'namespace="serving"'},
        },
    }
    prefill = {
        "objectives": {"ttftP90Ms": 800},
        "metrics": {"source": "scrape", "scrape": {"endpoints": ["https://a:8000/metrics"]}},
    }
    release = render_values(
        {"pools": {"decode": {"capacityPolicy": decode}, "prefill": {"capacityPolicy": prefill}}}
    )
    spec = release.get("CapacityPolicy", f"{FULLNAME}-decode")["spec"]
    # Objectives merge with the defaults in values.yaml, as Helm merges maps.
    assert spec["objectives"] == {
        "itlP90Ms": 50,
        "kvCacheUtilization": 0.8,
        "queueDepthPerReplica": 4,
    }
    assert {f: spec[f] for f in POLICY_FIELDS[1:]} == {f: decode[f] for f in POLICY_FIELDS[1:]}
    spec = release.get("CapacityPolicy", f"{FULLNAME}-prefill")["spec"]
    assert (spec["objectives"]["ttftP90Ms"], spec["metrics"]) == (800, prefill["metrics"])
    assert [e for o in release.objects for e in admission_errors(o)] == []
