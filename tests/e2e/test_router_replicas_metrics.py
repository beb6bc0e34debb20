"""Two router replicas in a real local Ray Serve application serve one cluster-wide
/metrics: whichever replica the Serve proxy hands a scrape to, the router's own totals are
the sum over both replicas, and they stay when one replica is scaled away.

The application is `services.app.build_app` (colocated: a router and one decode replica of
the default model), resized the way `baton serve`'s autoscaler and the chart resize it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.app import build_app
from services.router.metrics_page import RouterSeries
from services.serving_config import ServingConfig
from services.telemetry import E2E
from tests.ports import free_port

pytestmark = pytest.mark.slow

APP = "baton"
MODEL = "smollm2-135m-instruct"
REQUESTS = f'{E2E.name}_count{{pool="router",model="{MODEL}"}}'


class App:
    def __init__(self, url: str) -> None:
        self.url = url

    def complete(self) -> None:
        body = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0}
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text

    def requests_on_the_page(self) -> float:
        """The router's E2E request count on the /metrics of whichever replica answers."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).raise_for_status().text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
                if f"{s.name}{{{labels}}}" == REQUESTS:
                    return s.value
        return 0.0

    def requests_per_replica(self) -> list[int]:
        """Each router replica's own E2E count, asked of every replica by broadcast."""
        from ray import serve

        routers = serve.get_deployment_handle("router", APP)
        answers: list[RouterSeries] = routers.broadcast("router_series").results(timeout_s=30)
        return sorted(
            sum(sum(s.counts) for s in a.own.series if s.metric == E2E)  # pool="router"
            for a in answers
        )

    def scale_router(self, replicas: int) -> None:
        from baton.local_autoscaler import ServeReplicas

        ServeReplicas(APP).scale("router", replicas)
        eventually(lambda: len(self.requests_per_replica()) == replicas, timeout_s=60)


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    config: dict[str, Any] = {
        "mode": "colocated",
        "model": {"max_model_len": 256},
        "decode": {"replicas": 1, "kv_cache_bytes": 16 * 2**20, "torch_threads": 1},
        # Port 0: the two router replicas share this machine, each its own gRPC port.
        "router": {"http_port": free_port(), "grpc_port": 0},
    }
    serving = ServingConfig.model_validate(config)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": serving.router.http_port})
        serve.run(build_app(serving), name=APP, route_prefix="/", external_scaler_enabled=True)
        yield App(f"http://127.0.0.1:{serving.router.http_port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_router_replica_serves_the_sum_of_both(app: App) -> None:
    app.scale_router(2)
    sent = 0
    # The proxy picks a replica per request: go on until both have served some.
    while min(app.requests_per_replica()) == 0:
        assert sent < 40, f"one router replica got none of {sent} requests"
        app.complete()
        sent += 1
    eventually(lambda: sum(app.requests_per_replica()) == sent)  # E2E lands after the body
    # Each scrape lands on either replica; every one must read both replicas' requests.
    assert [app.requests_on_the_page() for _ in range(12)] == [sent] * 12

    app.scale_router(1)  # a router replica that leaves keeps its totals on the page
    (remaining,) = app.requests_per_replica()
    assert 0 < remaining < sent
    assert app.requests_on_the_page() == sent
    app.complete()
    eventually(lambda: app.requests_on_the_page() == sent + 1)
