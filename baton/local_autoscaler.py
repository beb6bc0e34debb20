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
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import aiohttp

from operators.autoscaler import Autoscaler
from operators.metrics_window import MetricsWindow
from operators.policy_engine import Decision
from operators.pool_policy import Pool, PoolPolicy
from operators.scrape_source import ScrapeSource

_T = TypeVar("_T")


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
    """Scales the pools of `policies` until stopped.

    A round that fails (the router's /metrics unreadable, the Serve controller restarting
    or timing out) is reported once per kind of failure and retried next round: a resize
    that failed keeps the current size, and the loop goes on, since `baton serve` goes on
    serving.
    """

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
        self._failing: dict[str, str] = {}  # what failed -> the kind of failure last reported

    def run(self, stop: threading.Event) -> None:
        """Scale until `stop` is set (runs its own event loop: call it on a thread)."""
        asyncio.run(self._loop(stop))

    async def _loop(self, stop: threading.Event) -> None:
        async with aiohttp.ClientSession() as session:
            source = ScrapeSource([self.metrics_url], session, self.model)
            while not stop.is_set():
                await self._attempt("a round", self._round(source))
                await asyncio.to_thread(stop.wait, self.interval_s)

    async def _round(self, source: ScrapeSource) -> None:
        window = await self._attempt("reading metrics", source.window())
        if window is not None:
            self.step(window)
        self._report_running()

    def step(self, window: MetricsWindow) -> None:
        now = time.monotonic()
        decisions = self.autoscaler.step(window, self.current, now)
        for decision in decisions.values():
            if decision.changes:
                self._resize(decision, now)

    def _resize(self, decision: Decision, now: float) -> None:
        what = f"resizing {decision.pool}"
        try:
            self.replicas.scale(decision.pool, decision.desired_replicas)
        except Exception as e:  # the size stays; the next round decides again
            self._failed(what, e)
            return
        self._recovered(what)
        self.report(describe(decision))
        self.autoscaler.applied(decision, now)
        self.current[decision.pool] = decision.desired_replicas

    def _report_running(self) -> None:
        for pool in self.current:
            what = f"reading {pool}'s running replicas"
            try:
                running = self.replicas.running(pool)
            except Exception as e:
                self._failed(what, e)
                continue
            self._recovered(what)
            if running != self._running.get(pool):
                self._running[pool] = running
                self.report(f"autoscaler: {pool} has {running} running replicas")

    async def _attempt(self, what: str, work: Awaitable[_T]) -> _T | None:
        try:
            result = await work
        except Exception as e:  # anything: one bad round must not end autoscaling for good
            self._failed(what, e)
            return None
        self._recovered(what)
        return result

    def _failed(self, what: str, error: Exception) -> None:
        """Report a failure when it starts or changes kind, not on every round it lasts."""
        kind = type(error).__name__
        if self._failing.get(what) != kind:
            self._failing[what] = kind
            self.report(
                f"autoscaler: {what} failed ({kind}: {error}); retrying every {self.interval_s:g} s"
            )

    def _recovered(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            self.report(f"autoscaler: {what} works again")
