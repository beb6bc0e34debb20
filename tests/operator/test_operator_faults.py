"""The operator when its inputs or the API server misbehave: telemetry that is not a
number or is negative, a status write the API server refuses. Each is reported, and the
policy keeps running: its timer must outlive any one bad pass."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import aiohttp.web
import kmock
import pytest

from tests.operator.cluster import CAPACITY_POLICIES, DEPLOYMENTS, Cluster
from tests.operator.conftest import eventually
from tests.operator.telemetry_page import TelemetryPage
from tests.operator.test_operator import (
    DEPLOYMENT_REF,
    NS,
    UNLIMITED,
    condition,
    create_deployment,
    create_policy,
    decode_spec,
    events,
    policy_status,
)

pytestmark = pytest.mark.usefixtures("operator")


class RefusingCluster(Cluster):
    """Refuses CapacityPolicy status writes while `refusing` is set, with the 400 a real
    API server gives a body it cannot decode (NaN, say)."""

    refusing = False

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if (
            self.refusing
            and request.resource == kmock.resource(CAPACITY_POLICIES)
            and request.subresource == "status"
            and request.action == kmock.action.UPDATE
        ):
            status = {"kind": "Status", "status": "Failure", "reason": "BadRequest", "code": 400}
            body = {**status, "message": "json: cannot decode the request body"}
            return aiohttp.web.json_response(body, status=400)
        return await super()._handle(request)


@pytest.fixture
async def cluster() -> AsyncIterator[RefusingCluster]:
    async with RefusingCluster() as handler, kmock.Server(handler):
        handler.declare_baton_resources()
        yield handler


def replicas(cluster: Cluster) -> int:
    return int(cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"])


@pytest.mark.parametrize(
    ("bad_waiting", "bad_usage"),
    [(math.inf, math.nan), (-8.0, -0.5)],  # garbage; or gauges decremented past zero
    ids=["not-a-number", "negative"],
)
async def test_telemetry_that_is_no_measurement_is_missing_metrics(
    cluster: Cluster, telemetry: TelemetryPage, bad_waiting: float, bad_usage: float
) -> None:
    waiting = telemetry.waiting.labels("decode", "smollm2")
    kv_usage = telemetry.kv_usage.labels("decode", "smollm2")
    waiting.set(4)
    kv_usage.set(0.5)
    objectives = {"queueDepthPerReplica": 2, "kvCacheUtilization": 0.8}
    await create_deployment(cluster, "decode", 2)
    spec = decode_spec(telemetry, DEPLOYMENT_REF, objectives=objectives, behavior=UNLIMITED)
    await create_policy(cluster, "dec", spec)
    await eventually(lambda: condition(cluster, "dec", "Ready") == ("True", "Reconciled"))

    waiting.set(bad_waiting)
    kv_usage.set(bad_usage)
    await eventually(
        lambda: condition(cluster, "dec", "ScalingActive") == ("False", "MissingMetrics")
    )
    status = policy_status(cluster, "dec")
    assert condition(cluster, "dec", "Ready") == ("False", "MissingMetrics")
    assert (status["currentReplicas"], status["desiredReplicas"]) == (2, 2)  # size kept
    assert "requestsWaiting" not in status["lastMetrics"]  # not the last finite reading
    assert "kvCacheUtilization" not in status["lastMetrics"]
    assert status["recommendations"] == []
    assert replicas(cluster) == 2

    waiting.set(12)  # numbers again: the policy is alive and scales
    await eventually(lambda: replicas(cluster) == 6)
    await eventually(lambda: condition(cluster, "dec", "Ready") == ("True", "Reconciled"))


async def test_a_refused_status_write_is_reported_and_the_policy_keeps_running(
    cluster: RefusingCluster, telemetry: TelemetryPage
) -> None:
    waiting = telemetry.waiting.labels("decode", "smollm2")
    waiting.set(4)
    await create_deployment(cluster, "decode", 2)
    cluster.refusing = True
    await create_policy(cluster, "dec", decode_spec(telemetry, DEPLOYMENT_REF, behavior=UNLIMITED))

    (warning,) = await eventually(lambda: events(cluster, "dec", "FailedUpdateStatus"))
    assert warning["type"] == "Warning"
    assert warning["message"] == (
        "cannot write the status: 400 BadRequest: json: cannot decode the request body"
    )
    waiting.set(12)  # the policy still scales while its status cannot be written
    await eventually(lambda: replicas(cluster) == 6)
    assert policy_status(cluster, "dec") == {}

    cluster.refusing = False
    await eventually(lambda: policy_status(cluster, "dec").get("currentReplicas") == 6)
    assert condition(cluster, "dec", "Ready") == ("True", "Reconciled")
    assert len(events(cluster, "dec", "FailedUpdateStatus")) == 1  # reported once
