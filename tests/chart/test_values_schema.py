"""`helm install` refuses bad values with a message that names the field and the limit:
values.schema.json for single values, the chart's `fail` checks for rules across values."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.chart.chart import render_values

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
]


@pytest.mark.parametrize(("values", "message"), TEMPLATE_ERRORS)
def test_chart_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        render_values(values)
    assert message in str(raised.value)


def test_colocated_mode_takes_no_prefill_replicas() -> None:
    """Only disaggregated mode needs a prefill pool; the schema's rule follows the mode."""
    release = render_values({"mode": "colocated", "pools": {"prefill": {"replicas": 0}}})
    assert release.serving_config["prefill"]["replicas"] == 0
