"""CrdSchema: validate objects against a CRD the way the API server would, without one.

1. defaulting: structural-schema defaults, applied top-down, so a defaulted object's
   own children are defaulted too (`behavior: default: {}` fills scaleUp's policies);
2. the OpenAPI v3 schema, converted to JSON Schema 2020-12 and checked by `jsonschema`
   (OpenAPI's boolean exclusiveMinimum becomes numeric; unknown fields are errors, as
   with `kubectl --validate=strict`);
3. every `x-kubernetes-validations` CEL rule, evaluated by a real CEL implementation
   (`cel`, from PyPI common-expression-language) with `self` bound to its node.

Errors read `path: message`, with the rule's own message for CEL.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml

ROOT = Path(__file__).parents[2]
CRD_PATH = ROOT / "charts" / "baton" / "crds" / "capacitypolicy.yaml"

_KEEP = {
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "minProperties",
    "maxProperties",
}


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    for bound in ("Minimum", "Maximum"):
        if node.get(f"exclusive{bound}") is True:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
    return out


class CrdSchema:
    def __init__(self, crd: dict[str, Any], version: str = "v1alpha1") -> None:
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        self.openapi: dict[str, Any] = served["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft202012Validator(to_json_schema(self.openapi))

    @classmethod
    def load(cls, path: Path = CRD_PATH) -> CrdSchema:
        return cls(yaml.safe_load(path.read_text()))

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(obj)
        _default(self.openapi, out)
        return out

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Everything the API server would refuse `obj` for; [] when it is admitted."""
        obj = self.defaulted(obj)
        found = [
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(self._validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        ]
        if found:  # CEL rules only see schema-valid objects, as on the API server
            return found
        _cel(self.openapi, obj, "", found)
        return found


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(schema["items"], item)


def _cel(schema: dict[str, Any], value: Any, path: str, found: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            ok = cel.evaluate(rule["rule"], {"self": value})
        except Exception as e:  # a rule that cannot evaluate rejects the object, as in k8s
            ok, rule = False, {**rule, "message": f"{rule['message']} ({e})"}
        if ok is not True:
            found.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _cel(sub, value[name], f"{path}.{name}".lstrip("."), found)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _cel(schema["items"], item, f"{path}[{i}]", found)
