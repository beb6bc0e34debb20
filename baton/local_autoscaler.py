"""The local autoscaler of `baton serve --policy policy.yaml`: the operator's policy engine
against the Ray Serve application on this machine, no Kubernetes.

    every --policy-interval seconds:
        window    = the router's /metrics, read like the operator's `source: scrape`
        decisions = Autoscaler(policies).step(window, current sizes, now)
        resize the `prefill` / `decode` deployment of each decision that changes

Resizing uses Ray Serve's external scaler API (the application is deployed with
`external_scaler_enabled=True`): the controller call behind the dashboard's
`POST /api/v1/applications/{app}/deployments/{name}/scale`. Only the replica count
changes; running replicas are neither restarted nor redeployed. A policy names its pool;
the deployment of that name is the one resized (`scaleTargetRef` is the operator's).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

import aiohttp

from operators.autoscaler import Autoscaler
from operators.metrics_source import MetricsUnavailable
from operators.metrics_window import MetricsWindow
from operators.policy_engine import Decision
from operators.pool_policy import Pool, PoolPolicy
from operators.scrape_source import ScrapeSource


class ServeReplicas:
    """Reads and sets the replica counts of one Serve application's deployments."""

    def __init__(self, app: str) -> None:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        self.app = app
        self._controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)

    def scale(self, deployment: str, replicas: int) -> None:
        import ray
        from ray.serve._private.common import DeploymentID

        target = DeploymentID(name=deployment, app_name=self.app)
        ray.get(self._controller.update_deployment_replicas.remote(target, replicas))

    def running(self, deployment: str) -> int:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        status = serve.status().applications[self.app].deployments[deployment]
        return status.replica_states.get(ReplicaState.RUNNING, 0)


def describe(decision: Decision) -> str:
    why = ", ".join(f"{s.name} {s.observed:g}/{s.target:g}" for s in decision.signals)
    return (
        f"autoscaler: {decision.pool} {decision.current_replicas} -> "
        f"{decision.desired_replicas} replicas ({why})"
    )


class LocalAutoscaler:
    def __init__(
        self,
        policies: Mapping[Pool, PoolPolicy],
        metrics_url: str,
        model: str,
        replicas: ServeReplicas,
        current: Mapping[Pool, int],
        interval_s: float,
        report: Callable[[str], None] = print,
    ) -> None:
        self.autoscaler = Autoscaler(policies)
        self.metrics_url, self.model = metrics_url, model
        self.replicas = replicas
        self.current = dict(current)
        self.interval_s = interval_s
        self.report = report
        self._running = dict(current)

    def run(self, stop: threading.Event) -> None:
        """Scale until `stop` is set (runs its own event loop: call it on a thread)."""
        asyncio.run(self._loop(stop))

    async def _loop(self, stop: threading.Event) -> None:
        async with aiohttp.ClientSession() as session:
            source = ScrapeSource([self.metrics_url], session, self.model)
            while not stop.is_set():
                try:
                    window = await source.window()
                except MetricsUnavailable as e:
                    self.report(f"autoscaler: no metrics this round: {e}")
                else:
                    self.step(window)
                self._report_running()
                await asyncio.to_thread(stop.wait, self.interval_s)

    def step(self, window: MetricsWindow) -> None:
        now = time.monotonic()
        decisions = self.autoscaler.step(window, self.current, now)
        for decision in decisions.values():
            if decision.changes:
                self.report(describe(decision))
                self.replicas.scale(decision.pool, decision.desired_replicas)
                self.autoscaler.applied(decision, now)
                self.current[decision.pool] = decision.desired_replicas

    def _report_running(self) -> None:
        for pool in self.current:
            running = self.replicas.running(pool)
            if running != self._running.get(pool):
                self._running[pool] = running
                self.report(f"autoscaler: {pool} has {running} running replicas")
