"""Two router replicas in a real local Ray Serve application: they serve one cluster-wide
/metrics (whichever replica the Serve proxy hands a scrape to, the router's own totals are
the sum over both replicas, and they stay when one replica is scaled away), and a replica
scaled away finishes the gRPC streams it serves.

The application is `services.app.build_app` (colocated: a router and one decode replica of
the default model), resized the way `baton serve`'s autoscaler and the chart resize it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
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

    def grpc_ports(self) -> list[int]:
        from ray import serve

        routers = serve.get_deployment_handle("router", APP)
        ports: list[int] = routers.broadcast("grpc_port").results(timeout_s=30)
        return ports

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


class GrpcStream:
    """One greedy generation streamed from a router replica's gRPC port, on a thread: the
    tokens, finish reason or error it ended with."""

    def __init__(self, port: int, max_tokens: int) -> None:
        self.tokens = 0
        self.finish_reason = ""
        self.error: grpc.RpcError | None = None
        request = pb.GenerateRequest(
            prompt="1, 2, 3,", max_tokens=max_tokens, temperature=0, ignore_eos=True
        )
        self._thread = threading.Thread(target=self._run, args=(port, request), daemon=True)
        self._thread.start()

    def _run(self, port: int, request: pb.GenerateRequest) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                for out in pb_grpc.InferenceStub(channel).Generate(request, timeout=120):
                    self.tokens += len(out.token_ids)
                    self.finish_reason = out.finish_reason or self.finish_reason
            except grpc.RpcError as e:
                self.error = e

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the stream did not end"


def test_a_router_replica_scaled_away_finishes_its_grpc_streams(app: App) -> None:
    """Serve lets a replica it removes finish the HTTP requests the proxy handed over, but
    the router's gRPC server is its own: its streams were cut when the replica stopped."""
    app.scale_router(2)
    ports = app.grpc_ports()
    assert len(set(ports)) == 2
    streams = [GrpcStream(port, max_tokens=200) for port in ports]
    eventually(lambda: all(s.tokens > 0 or not s.running() for s in streams), timeout_s=60)
    assert all(s.running() for s in streams)  # the removal begins while both run
    app.scale_router(1)
    for s in streams:
        s.join()
    assert [(s.error, s.finish_reason, s.tokens) for s in streams] == [(None, "length", 200)] * 2
    (port,) = app.grpc_ports()
    assert port in ports
