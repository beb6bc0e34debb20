"""Draining: every Ray pod that serves requests gets a termination grace period longer
than its drain, so Kubernetes does not kill a replica while it finishes its requests."""

from __future__ import annotations

import pytest

from services.serving_config import ServingConfig
from tests.chart.chart import ray_templates, render_values


@pytest.mark.parametrize("drain", [60, 300])
def test_grace_period_outlasts_the_drain(drain: int) -> None:
    pool = {"drainTimeoutSeconds": drain}
    release = render_values(
        {
            "router": {"drainTimeoutSeconds": drain},
            "pools": {"prefill": pool, "decode": pool},
        }
    )
    groups = dict(ray_templates(release.rayservice))
    for group in ("router", "prefill", "decode"):
        assert groups[group]["spec"]["terminationGracePeriodSeconds"] > drain, group
    config = ServingConfig.model_validate(release.serving_config)
    assert config.router.drain_timeout_s == drain
    assert config.decode.drain_timeout_s == config.prefill.drain_timeout_s == drain
