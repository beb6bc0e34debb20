"""The Ray Serve application: deployments `router` (ingress), `prefill`, `decode`.

    app = build_app(config)          # ServingConfig
    serve.run(app, name="baton")

The deployment classes only build their injected parts from the config; the behaviour is
in the plain classes (PrefillServer, DecodeServer, DisaggregatedPipeline, the API front
ends), which tests also run without Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.async_engine import AsyncEngine
from services.decode.server import DecodeServer
from services.kv_bridge import KVBridge
from services.kvstore.client import ClientConfig, KVStoreClient
from services.prefill.server import PrefillServer
from services.router.api_keys import ApiKeys
from services.router.disaggregated import DisaggregatedPipeline
from services.router.errors import NotReadyError
from services.router.grpc_api import build_grpc_server
from services.router.http_api import build_http_app
from services.router.instrumented_pipeline import InstrumentedPipeline
from services.router.metrics_page import MetricsPage, RouterSeries, pipeline_readings
from services.router.pipeline import Pipeline
from services.router.pool_clients import RayDecodePool, RayPrefillPool, StorePrefixIndex
from services.serving_config import PoolSection, ServingConfig
from services.telemetry import Telemetry
from services.tracing import configure_tracing

log = logging.getLogger(__name__)
ROUTING_STATS_PERIOD_S = 1.0
SERVER_STOP_GRACE_S = 1.0
"""What a drained router replica's gRPC server gives the calls left (health watches, a
request that outlasted the drain) before it cancels them."""


def _engine(config: ServingConfig, pool: PoolSection) -> AsyncEngine:
    if pool.torch_threads:
        torch.set_num_threads(pool.torch_threads)
    return AsyncEngine(config.engine_args(pool).create_engine())


def _bridge(config: ServingConfig, engine: AsyncEngine) -> KVBridge:
    kv = config.kvstore
    return KVBridge(engine, kv.targets, kv.timeout_s, kv.lease_ttl_s, kv.client_security())


class PrefillDeployment(PrefillServer):
    def __init__(self, config_json: str) -> None:
        configure_tracing("baton-prefill")
        config = ServingConfig.model_validate_json(config_json)
        engine = _engine(config, config.prefill)
        super().__init__(engine, _bridge(config, engine), config.model.served_name)


class DecodeDeployment(DecodeServer):
    def __init__(self, config_json: str) -> None:
        configure_tracing("baton-decode")
        config = ServingConfig.model_validate_json(config_json)
        pool = config.decode
        engine = _engine(config, pool)
        bridge = _bridge(config, engine) if config.mode == "disaggregated" else None
        super().__init__(engine, bridge, config.model.served_name)


# One pipeline and metrics page per router replica process; the API front ends look them
# up per request.
_pipeline: dict[str, Pipeline] = {}
_metrics: dict[str, MetricsPage] = {}


def _current_pipeline() -> Pipeline:
    if "router" not in _pipeline:
        raise NotReadyError("the router is still connecting to its pools")
    return _pipeline["router"]


async def _render_metrics() -> str:
    if "router" not in _metrics:
        raise NotReadyError("the router is still connecting to its pools")
    return await _metrics["router"].render()


# The HTTP app is built on the replica once __init__ has run (Serve calls
# __serve_build_asgi_app__), with the replica's own keys and the config's limits.
@serve.ingress()
class RouterDeployment:
    async def __init__(  # type: ignore[misc]
        self, config_json: str, decode: DeploymentHandle, prefill: DeploymentHandle | None
    ) -> None:
        configure_tracing("baton-router")
        config = ServingConfig.model_validate_json(config_json)
        self.router_config = config.router
        # The keys are the router pod's (a Secret on Kubernetes), not the driver's.
        self.api_keys = ApiKeys.from_environment()
        self.api_keys.check_exposure(config.router.host, config.router.allow_unauthenticated)
        kv = config.kvstore
        self.decode = RayDecodePool(decode)
        self.prefill = None if prefill is None else RayPrefillPool(prefill)
        decode_card = await decode.describe.remote()
        prefill_card = decode_card if prefill is None else await prefill.describe.remote()
        index = None
        if self.prefill is not None:
            client = KVStoreClient(
                kv.targets,
                prefill_card.fingerprint,
                prefill_card.block_format,
                ClientConfig(timeout_s=kv.timeout_s, security=kv.client_security()),
            )
            index = StorePrefixIndex(client)
        self.index = index
        self.pipeline = DisaggregatedPipeline(
            prefill_card,
            decode_card,
            self.prefill,
            self.decode,
            index,
            config.router.local_prefill_threshold,
            config.router.prefill_timeout_s,
            kv.timeout_s,
            config.router.max_inflight_requests,
            request_timeout_s=config.router.request_timeout_s,
            stall_timeout_s=config.router.stall_timeout_s,
            max_remote_prefills=config.router.max_remote_prefills,
        )
        telemetry = Telemetry("router", self.pipeline.model_id)
        telemetry.observe(lambda: pipeline_readings(self.pipeline))
        pools = [self.decode.metrics] + ([self.prefill.metrics] if self.prefill else [])
        # Every router replica's page sums all router replicas' series: a handle to this
        # deployment asks each replica (this one too) for its `router_series`.
        deployment = serve.get_replica_context().replica_id.deployment_id
        routers = serve.get_deployment_handle(deployment.name, deployment.app_name)

        async def router_replicas() -> list[RouterSeries]:
            results: list[RouterSeries] = await routers.broadcast("router_series").results_async(
                timeout_s=5
            )
            return results

        self.grpc, self.grpc_bound_port = build_grpc_server(
            _current_pipeline,
            config.router.grpc_port,
            config.router.host,
            self.api_keys,
            config.router.max_request_bytes,
        )
        await self.grpc.start()
        _pipeline["router"] = InstrumentedPipeline(self.pipeline, telemetry)
        self.page = MetricsPage(telemetry, pools, router_replicas)
        _metrics["router"] = self.page

    def router_series(self) -> RouterSeries:
        """This replica's part of every router replica's /metrics (MetricsPage.shared)."""
        return self.page.shared()

    async def drain(self, timeout_s: float) -> int:
        """`baton serve`'s SIGTERM: finish what is in flight, refuse the rest."""
        return await self.pipeline.drain(timeout_s)

    def grpc_port(self) -> int:
        """The port this replica's gRPC server listens on (the config's, or the one it
        picked when the config says 0)."""
        return self.grpc_bound_port

    async def __del__(self) -> None:
        """Serve is removing this replica (scale-down, upgrade, the application deleted).
        Serve has let the HTTP requests it handed over finish, but the gRPC server is the
        router's own, unknown to Serve: its calls are drained here. New calls are refused
        (UNAVAILABLE, health NOT_SERVING, so clients go to another replica) while those in
        flight finish, for up to the drain timeout; then the server stops (ending health
        watches) and the lease releases still trying end."""
        if not hasattr(self, "page"):  # __init__ did not finish: nothing was served
            return
        cut = await self.pipeline.drain(self.router_config.drain_timeout_s)
        if cut:
            log.warning(
                "router replica removed: %d requests did not finish in %g s",
                cut,
                self.router_config.drain_timeout_s,
            )
        await self.grpc.stop(grace=SERVER_STOP_GRACE_S)
        if self.index is not None:
            await self.index.close()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(
            _current_pipeline,
            self.api_keys,
            _render_metrics,
            self.router_config.max_request_bytes,
        )


def build_app(config: ServingConfig) -> Any:
    """The bound application for `serve.run`."""
    blob = config.model_dump_json()

    def options(name: str, pool: PoolSection, router: str) -> dict[str, Any]:
        return {
            "name": name,
            "num_replicas": pool.replicas,
            "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
            "max_ongoing_requests": pool.max_num_seqs * 4,
            # A replica being removed (scale-down, upgrade) takes no new request and
            # finishes those it has for up to this long; any left then migrate.
            "graceful_shutdown_timeout_s": pool.drain_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
            "request_router_config": {
                "request_router_class": f"services.router.ray_request_routers:{router}",
                "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
            },
        }

    decode_options = options("decode", config.decode, "DecodeRequestRouter")
    decode = serve.deployment(**decode_options)(DecodeDeployment).bind(blob)
    prefill = None
    if config.mode == "disaggregated":
        prefill_options = options("prefill", config.prefill, "PrefillRequestRouter")
        prefill = serve.deployment(**prefill_options)(PrefillDeployment).bind(blob)
    limit = config.router.max_inflight_requests
    router = serve.deployment(
        name="router",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        # Serve's default (5 at a time, an unbounded queue before them) would cap the
        # whole platform at 5 requests and hide overload in the proxy's memory. The router
        # takes ten times its limit, answering the excess itself (429 with Retry-After
        # costs it next to nothing); a burst the proxy has not handed over yet waits in
        # a queue as bounded (a few KiB a request), beyond which the proxy says 503.
        max_ongoing_requests=10 * limit + 64,
        max_queued_requests=10 * limit,
        # Removal drains the router's own gRPC calls in __del__ after Serve's HTTP ones.
        graceful_shutdown_timeout_s=config.router.drain_timeout_s + SERVER_STOP_GRACE_S + 5,
        graceful_shutdown_wait_loop_s=1.0,
    )
    return router(RouterDeployment).bind(blob, decode, prefill)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: KubeRay's `serveConfigV2` names
    `services.app:app_builder` with the ServingConfig as `args` (the Helm chart writes it)."""
    return build_app(ServingConfig.model_validate(args))
