"""The pydantic boundary: CRD spec -> the engine's frozen dataclasses, and policy files
for `baton serve --policy`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from operators.policy_spec import CapacityPolicySpec, describe, load_policy_file
from operators.pool_policy import (
    DEFAULT_SCALE_UP,
    Behavior,
    Capacity,
    Objectives,
    PolicyType,
    Pool,
    PoolPolicy,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
)
from tests.operator.crd_schema import ROOT

EXAMPLES = ROOT / "charts" / "baton" / "examples"


def spec_of(name: str) -> CapacityPolicySpec:
    return CapacityPolicySpec.model_validate(yaml.safe_load((EXAMPLES / name).read_text())["spec"])


def test_prefill_example_becomes_the_engine_policy() -> None:
    assert spec_of("capacitypolicy-prefill.yaml").pool_policy() == PoolPolicy(
        pool=Pool.PREFILL,
        min_replicas=1,
        max_replicas=8,
        objectives=Objectives(ttft_p90_s=0.8, queue_depth_per_replica=4),
        capacity=Capacity(tokens_per_second_per_replica=12000, target_utilization=0.7),
        behavior=Behavior(
            scale_up=ScalingRules(0, (ScalingPolicy(PolicyType.PODS, 2, 30),)),
            scale_down=ScalingRules(300, (ScalingPolicy(PolicyType.PODS, 1, 60),)),
        ),
    )


def test_decode_example_keeps_default_scale_up_and_its_min_select() -> None:
    policy = spec_of("capacitypolicy-decode.yaml").pool_policy()
    assert policy.objectives == Objectives(itl_p90_s=0.04, kv_cache_utilization=0.75)
    assert policy.capacity == Capacity(2500, 64, 0.8)
    assert policy.behavior.scale_up == DEFAULT_SCALE_UP
    assert policy.behavior.scale_down.select_policy is SelectPolicy.MIN
    assert policy.behavior.scale_down.stabilization_window_seconds == 600


def test_source_settings_are_parsed() -> None:
    spec = spec_of("capacitypolicy-deployment-scrape.yaml")
    assert spec.metrics is not None and spec.metrics.scrape is not None
    assert spec.metrics.scrape.timeout_seconds == 1
    prom = spec_of("capacitypolicy-prefill.yaml").metrics
    assert prom is not None and prom.prometheus is not None
    assert (prom.prometheus.metric_prefix, prom.prometheus.selector) == (
        "baton_",
        'namespace="llm"',
    )


def test_errors_name_the_field_and_the_limit() -> None:
    raw = yaml.safe_load((EXAMPLES / "capacitypolicy-decode.yaml").read_text())["spec"]
    with pytest.raises(ValidationError) as e:
        CapacityPolicySpec.model_validate({**raw, "maxReplicas": 0})
    assert "maxReplicas" in str(e.value) and "greater than or equal to 1" in str(e.value)


def test_errors_read_as_field_path_and_message() -> None:
    raw = yaml.safe_load((EXAMPLES / "capacitypolicy-decode.yaml").read_text())["spec"]
    bad_step = {"type": "Pods", "value": 0, "periodSeconds": 15}
    with pytest.raises(ValidationError) as e:
        CapacityPolicySpec.model_validate(
            {
                **raw,
                "minReplicas": "many",
                "behavior": {"scaleUp": {"policies": [bad_step]}},
                "scaleTargetRef": {"apiVersion": "ray.io/v1", "kind": "RayService", "name": "x"},
            }
        )
    assert describe(e.value) == (
        "spec.scaleTargetRef: scaleTargetRef.deployment is required when kind is RayService; "
        "spec.minReplicas: Input should be a valid integer, unable to parse string as an integer; "
        "spec.behavior.scaleUp.policies[0].value: Input should be greater than or equal to 1"
    )
    with pytest.raises(ValidationError) as e:
        CapacityPolicySpec.model_validate({**raw, "minReplicas": 20, "maxReplicas": 4})
    assert describe(e.value) == "spec: minReplicas must be less than or equal to maxReplicas"


def test_policy_file_holds_one_policy_per_pool(tmp_path: Path) -> None:
    docs = [
        (EXAMPLES / n).read_text()
        for n in ("capacitypolicy-prefill.yaml", "capacitypolicy-decode.yaml")
    ]
    path = tmp_path / "policy.yaml"
    path.write_text("\n---\n".join(docs))
    policies = load_policy_file(path)
    assert set(policies) == {Pool.PREFILL, Pool.DECODE}
    assert policies[Pool.DECODE].max_replicas == 16

    path.write_text("\n---\n".join([docs[1], docs[1]]))
    with pytest.raises(ValueError, match="two policies for the decode pool"):
        load_policy_file(path)
    path.write_text("kind: ConfigMap\n")
    with pytest.raises(ValueError, match="expected kind CapacityPolicy, got 'ConfigMap'"):
        load_policy_file(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no CapacityPolicy in the file"):
        load_policy_file(path)
