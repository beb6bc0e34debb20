"""The values schema of `pools.*.capacityPolicy`, derived from the CapacityPolicy CRD.

The CRD (charts/baton/crds/capacitypolicy.yaml) is the one source of truth: its spec's
objectives, capacity, behavior and metrics become `definitions.capacityPolicySpec` of
values.schema.json, converted as tests.operator.crd_schema converts the whole CRD for the
admission checks (unknown fields refused), plus each `self.matches('<re>')` CEL rule as a
`pattern`. The CRD's other CEL rules are the chart's `fail` checks (templates/_validate.tpl).

`python -m tests.chart.policy_schema` rewrites values.schema.json with the derived schema;
tests/chart/test_policy_values.py checks the two agree.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import yaml

from tests.chart.chart import CHART_DIR
from tests.operator.crd_schema import CRD_PATH, to_json_schema

VALUES_SCHEMA = CHART_DIR / "values.schema.json"
# The spec fields a pool's values pass to its CapacityPolicy verbatim.
POLICY_FIELDS = ("objectives", "capacity", "behavior", "metrics")
_MATCHES = re.compile(r"^self\.matches\('(?P<pattern>[^']*)'\)$")


def crd_spec() -> dict[str, Any]:
    """The CRD's openAPIV3Schema of `spec`."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    spec: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def pattern_rule(rule: dict[str, str]) -> str | None:
    """The regular expression of a `self.matches('<re>')` rule, which a schema can check."""
    found = _MATCHES.match(rule["rule"])
    return found["pattern"] if found else None


def _with_patterns(node: dict[str, Any]) -> dict[str, Any]:
    out = dict(node)
    for rule in node.get("x-kubernetes-validations", []):
        if (pattern := pattern_rule(rule)) is not None:
            assert "pattern" not in out, "a field with both a pattern and a matches() rule"
            out["pattern"] = pattern
    if "properties" in node:
        out["properties"] = {k: _with_patterns(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = _with_patterns(node["items"])
    return out


def derived_policy_schema() -> dict[str, Any]:
    """`definitions.capacityPolicySpec` as values.schema.json must hold it."""
    spec = crd_spec()
    fields = {"type": "object", "properties": {f: spec["properties"][f] for f in POLICY_FIELDS}}
    return {
        "description": "CapacityPolicy spec fields, derived from crds/capacitypolicy.yaml "
        "by tests/chart/policy_schema.py: do not edit by hand.",
        **to_json_schema(_with_patterns(copy.deepcopy(fields))),
    }


def main() -> None:
    schema = json.loads(VALUES_SCHEMA.read_text())
    schema["definitions"]["capacityPolicySpec"] = derived_policy_schema()
    VALUES_SCHEMA.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
