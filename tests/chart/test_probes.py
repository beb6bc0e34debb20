"""Probes of the pods the chart deploys, as rendered, and what they check when run.

KubeRay gives a Ray container each probe it lacks (`initLivenessAndReadinessProbe` in
ray-operator/controllers/ray/common/pod.go): liveness asks the raylet through the dashboard
agent (`/api/local_raylet_healthz`, 10 minutes of failures), readiness too, plus, in a
RayService's worker pods, Serve's HTTP proxy at `/-/healthz` on the port named `serve`. A
probe given in the pod template replaces KubeRay's whole. The chart leaves the head and
the pools to KubeRay and gives the router pods their own readiness (raylet, proxy and the
router's gRPC server) and liveness (raylet only); the KV store and the operator have theirs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kvstore.security import ShardSecurity
from services.kvstore.server import KVStoreServer, ServerConfig
from services.kvstore.servicer import SERVICE_NAME as KVSTORE_SERVICE
from services.router.errors import NotReadyError
from services.router.grpc_api import SERVICE_NAME as INFERENCE_SERVICE
from services.router.grpc_api import build_grpc_server
from services.router.pipeline import Pipeline
from tests.chart.chart import CHART_DIR, FULLNAME, VALUE_SETS, Release, render, render_values
from tests.chart.test_render import admission_errors

DEFAULTS = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
RAY_AGENT = 52365  # Ray's dashboard agent in a worker pod: KubeRay's and Ray's default
value_sets = pytest.mark.parametrize("value_set", list(VALUE_SETS))


def _router(release: Release) -> dict[str, Any]:
    (container,) = release.worker_group("router")["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


def _container(release: Release, kind: str, component: str) -> dict[str, Any]:
    obj = release.get(kind, f"{FULLNAME}-{component}")
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


def _readiness_command(http_port: int, grpc_port: int, timeout: int) -> str:
    wget = f"wget --tries 1 -T {timeout} -q -O- http://localhost:{{}}/{{}} | grep -q success"
    grpc_check = f"""python -c 'import sys, grpc
from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc
check = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:{grpc_port}")).Check
request = pb.HealthCheckRequest(service="baton.v1.Inference")
try:
    status = check(request, timeout={timeout}).status
except grpc.RpcError as e:
    sys.exit(f"router gRPC health: {{e.code().name}}")
if status != pb.HealthCheckResponse.SERVING:
    sys.exit("router gRPC health: " + pb.HealthCheckResponse.ServingStatus.Name(status))'"""
    return " && ".join(
        [
            wget.format(RAY_AGENT, "api/local_raylet_healthz"),
            wget.format(http_port, "-/healthz"),
            grpc_check,
        ]
    )


# Router pods.


def test_router_probes_by_default() -> None:
    router = _router(render("default"))
    assert router["readinessProbe"] == {
        "exec": {"command": ["bash", "-c", _readiness_command(8000, 50051, timeout=5)]},
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": 2,
        "successThreshold": 1,
    }
    assert router["livenessProbe"] == {
        "httpGet": {"path": "/api/local_raylet_healthz", "port": RAY_AGENT},
        "initialDelaySeconds": 30,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 120,
    }
    assert "startupProbe" not in router
    # The thresholds are the values' (values.yaml documents them).
    for probe in ("readinessProbe", "livenessProbe"):
        assert router[probe].items() >= DEFAULTS["router"][probe].items()
    # The ports the probes reach are the pod's: the proxy's is the one KubeRay reads.
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert (ports["serve"], ports["grpc"]) == (8000, 50051)


def test_router_probe_values_override() -> None:
    release = render_values(
        {
            "router": {
                "httpPort": 8100,
                "grpcPort": 50061,
                "readinessProbe": {
                    "initialDelaySeconds": 15,
                    "periodSeconds": 10,
                    "timeoutSeconds": 3,
                    "failureThreshold": 4,
                    "successThreshold": 2,
                },
                "livenessProbe": {"initialDelaySeconds": 0, "failureThreshold": 240},
            }
        }
    )
    router = _router(release)
    assert router["readinessProbe"] == {
        "exec": {"command": ["bash", "-c", _readiness_command(8100, 50061, timeout=3)]},
        "initialDelaySeconds": 15,
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": 4,
        "successThreshold": 2,
    }
    assert router["livenessProbe"] == {
        "httpGet": {"path": "/api/local_raylet_healthz", "port": RAY_AGENT},
        "initialDelaySeconds": 0,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 240,
    }
    assert [e for o in release.objects for e in admission_errors(o)] == []


@value_sets
def test_only_the_router_pods_replace_kuberays_probes(value_set: str) -> None:
    """The head and the pools keep KubeRay's probes, which check Serve's proxy at their
    port named `serve`; the router's readiness is the chart's in every install."""
    release = render(value_set)
    cluster = release.rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    probes = {
        name: sorted(k for k in group["template"]["spec"]["containers"][0] if k.endswith("Probe"))
        for name, group in groups.items()
    }
    pools: dict[str, list[str]] = {n: [] for n in groups if n not in ("head", "router")}
    assert probes == {"head": [], "router": ["livenessProbe", "readinessProbe"], **pools}
    command = _router(release)["readinessProbe"]["exec"]["command"][2]
    assert "/-/healthz" in command and f'service="{INFERENCE_SERVICE}"' in command


class _HealthPages:
    """What Ray's dashboard agent or Serve's proxy answers at one path: status and body."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.status, self.body = 200, "success"
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        pages = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path == pages.path
                status, body = (pages.status, pages.body) if found else (404, "not found")
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *_: Any) -> None:
                pass

        return Handler

    @contextmanager
    def serving(self) -> Iterator[_HealthPages]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class _Router:
    """The router replica's readiness, as PipelineHealth reads it."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    def ready(self) -> bool:
        return not self.draining

    def pipeline(self) -> Pipeline:
        if not self.started:
            raise NotReadyError("the router is starting")
        return cast(Pipeline, self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_router_readiness_follows_raylet_proxy_and_grpc_server() -> None:
    """The rendered command, run by bash against a real router gRPC server
    (services.router.grpc_api) and stand-ins for the dashboard agent and Serve's proxy
    (their documented answers: `success`, or 503 with a reason), fails whenever one of
    the three would turn traffic away."""
    agent, proxy = _HealthPages("/api/local_raylet_healthz"), _HealthPages("/-/healthz")
    grpc_port = _free_port()
    release = render_values({"router": {"httpPort": proxy.port, "grpcPort": grpc_port}})
    command = _router(release)["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["bash", "-c"]
    agent_url = f"http://localhost:{RAY_AGENT}/"
    assert command[2].count(agent_url) == 1
    # The agent's port is fixed in a pod; here it is the stand-in's.
    script = command[2].replace(agent_url, f"http://localhost:{agent.port}/")
    # The image's `python` is the interpreter Baton is installed in: here, this one.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    async def probe() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode is not None
        return process.returncode, out.decode().strip()

    router = _Router()
    with agent.serving(), proxy.serving():
        assert await probe() == (1, "router gRPC health: UNAVAILABLE")  # not listening yet
        server, _ = build_grpc_server(router.pipeline, grpc_port, "127.0.0.1")
        await server.start()
        try:
            assert await probe() == (1, "router gRPC health: NOT_SERVING")  # replica starting
            router.started = True
            assert await probe() == (0, "")

            proxy.status, proxy.body = 503, "This node is being drained."
            assert (await probe())[0] != 0
            proxy.status, proxy.body = 200, "success"
            agent.status, agent.body = 503, "Local Raylet failed"
            assert (await probe())[0] != 0
            agent.status, agent.body = 200, "success"
            assert await probe() == (0, "")

            router.draining = True
            assert await probe() == (1, "router gRPC health: NOT_SERVING")
        finally:
            await server.stop(None)


# KV store shards.


def test_kvstore_probes_by_default() -> None:
    kvstore = _container(render("default"), "StatefulSet", "kvstore")
    # A gRPC probe takes a port number: Kubernetes' GRPCAction has no named port.
    health = {"port": 50052}
    assert kvstore["startupProbe"] == {
        "grpc": health,
        "periodSeconds": 2,
        "timeoutSeconds": 2,
        "failureThreshold": 60,
    }
    assert kvstore["readinessProbe"] == {
        "grpc": {**health, "service": "baton.v1.KVStore"},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
        "successThreshold": 1,
    }
    assert kvstore["livenessProbe"] == {
        "grpc": health,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 6,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert kvstore[probe].items() >= DEFAULTS["kvstore"][probe].items()
    assert {"name": "grpc", "containerPort": 50052, "protocol": "TCP"} in kvstore["ports"]


def test_kvstore_probe_values_override() -> None:
    release = render_values(
        {
            "kvstore": {
                "port": 50062,
                "startupProbe": {"periodSeconds": 5, "failureThreshold": 120},
                "readinessProbe": {"timeoutSeconds": 4, "successThreshold": 2},
                "livenessProbe": {"initialDelaySeconds": 20, "failureThreshold": 12},
            }
        }
    )
    kvstore = _container(release, "StatefulSet", "kvstore")
    assert kvstore["startupProbe"] == {
        "grpc": {"port": 50062},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 120,
    }
    assert kvstore["readinessProbe"] == {
        "grpc": {"port": 50062, "service": "baton.v1.KVStore"},
        "periodSeconds": 5,
        "timeoutSeconds": 4,
        "failureThreshold": 3,
        "successThreshold": 2,
    }
    assert kvstore["livenessProbe"] == {
        "grpc": {"port": 50062},
        "initialDelaySeconds": 20,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 12,
    }
    assert [e for o in release.objects for e in admission_errors(o)] == []


async def test_a_shard_serves_the_health_its_probes_ask_for() -> None:
    """What the kubelet sends: Check of each probe's service (none: ""), without the token
    the chart's shards require, over plaintext."""
    kvstore = _container(render("default"), "StatefulSet", "kvstore")
    services = {kvstore[p]["grpc"].get("service", "") for p in ("startupProbe", "livenessProbe")}
    services.add(kvstore["readinessProbe"]["grpc"]["service"])
    assert services == {"", KVSTORE_SERVICE}
    config = ServerConfig(
        shard_id="probed",
        capacity_bytes=1 << 20,
        host="127.0.0.1",
        port=0,
        shared_memory_dir=None,
        security=ShardSecurity(token="t" * 32),
    )
    server = KVStoreServer(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in sorted(services):
                request = health_pb2.HealthCheckRequest(service=service)
                reply = await health.Check(request, timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        await server.stop(None)


# The operator.


def test_operator_probes_by_default() -> None:
    operator = _container(render("default"), "Deployment", "operator")
    healthz = {"path": "/healthz", "port": "liveness"}
    assert operator["startupProbe"] == {
        "httpGet": healthz,
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": 24,
    }
    assert operator["livenessProbe"] == {
        "httpGet": healthz,
        "periodSeconds": 15,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    assert "readinessProbe" not in operator
    for probe in ("startupProbe", "livenessProbe"):
        assert operator[probe].items() >= DEFAULTS["operator"][probe].items()
    # The named port is where kopf serves its liveness endpoint (`--liveness`).
    assert operator["ports"] == [{"name": "liveness", "containerPort": 8080, "protocol": "TCP"}]
    assert "--liveness=http://0.0.0.0:8080/healthz" in operator["args"]


def test_operator_probe_values_override() -> None:
    release = render_values(
        {
            "operator": {
                "livenessPort": 8181,
                "startupProbe": {"failureThreshold": 60},
                "livenessProbe": {"periodSeconds": 30, "timeoutSeconds": 10},
            }
        }
    )
    operator = _container(release, "Deployment", "operator")
    healthz = {"path": "/healthz", "port": "liveness"}
    assert operator["startupProbe"] == {
        "httpGet": healthz,
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": 60,
    }
    assert operator["livenessProbe"] == {
        "httpGet": healthz,
        "periodSeconds": 30,
        "timeoutSeconds": 10,
        "failureThreshold": 3,
    }
    assert operator["ports"] == [{"name": "liveness", "containerPort": 8181, "protocol": "TCP"}]
    assert "--liveness=http://0.0.0.0:8181/healthz" in operator["args"]
    assert [e for o in release.objects for e in admission_errors(o)] == []
