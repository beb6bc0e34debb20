"""`baton serve`'s local autoscaler loop against a real /metrics page and a Serve stand-in
whose controller calls fail now and then: the loop reports, keeps the size, goes on."""

from __future__ import annotations

import asyncio
import threading

from baton.local_autoscaler import LocalAutoscaler, ServeReplicas
from operators.pool_policy import Objectives, Pool, PoolPolicy
from tests.operator.telemetry_page import TelemetryPage


class FlakyServe(ServeReplicas):
    """Serve's controller as it restarts: its first `failed_scales` resizes and
    `failed_reads` replica reads fail. After `rounds` reads it stops the autoscaler."""

    def __init__(
        self, stop: threading.Event, rounds: int, failed_scales: int = 0, failed_reads: int = 0
    ) -> None:
        self.stop, self.rounds = stop, rounds
        self.failed_scales, self.failed_reads = failed_scales, failed_reads
        self.scale_calls: list[tuple[str, int]] = []
        self.size = 1
        self.reads = 0

    def scale(self, deployment: str, replicas: int) -> None:
        self.scale_calls.append((deployment, replicas))
        if len(self.scale_calls) <= self.failed_scales:
            raise RuntimeError("Serve controller unavailable")
        self.size = replicas

    def running(self, deployment: str) -> int:
        self.reads += 1
        if self.reads == self.rounds:
            self.stop.set()
        if self.reads <= self.failed_reads:
            raise RuntimeError("Serve controller unavailable")
        return self.size


def run(autoscaler: LocalAutoscaler, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=autoscaler.run, args=(stop,))
    thread.start()
    return thread


async def test_serve_errors_are_reported_once_and_the_loop_goes_on(
    telemetry: TelemetryPage,
) -> None:
    telemetry.waiting.labels("decode", "m").set(40)  # asks for 10 replicas; max is 5
    policy = PoolPolicy(Pool.DECODE, 1, 5, Objectives(queue_depth_per_replica=4))
    stop = threading.Event()
    serve, lines = FlakyServe(stop, rounds=5, failed_scales=1, failed_reads=2), []
    autoscaler = LocalAutoscaler(
        {Pool.DECODE: policy}, telemetry.url, "m", serve, {Pool.DECODE: 1}, 0, lines.append
    )
    thread = run(autoscaler, stop)
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()

    assert serve.reads == 5  # every round ran, not only those before the first error
    # the failed resize kept the size at 1 (so the next round asked for 5 again)
    assert serve.scale_calls == [("decode", 5), ("decode", 5)]
    assert autoscaler.current == {Pool.DECODE: 5}
    unavailable = "(RuntimeError: Serve controller unavailable); retrying every 0 s"
    assert lines == [  # each failure once, not once per round
        f"autoscaler: resizing decode failed {unavailable}",
        f"autoscaler: reading decode's running replicas failed {unavailable}",
        "autoscaler: resizing decode works again",
        "autoscaler: decode 1 -> 5 replicas (queueDepthPerReplica 40/4)",
        "autoscaler: reading decode's running replicas works again",
        "autoscaler: decode has 5 running replicas",
    ]


async def test_unreadable_metrics_are_reported_once() -> None:
    policy = PoolPolicy(Pool.DECODE, 1, 5, Objectives(queue_depth_per_replica=4))
    stop = threading.Event()
    serve, lines = FlakyServe(stop, rounds=3), []
    url = "http://127.0.0.1:1/metrics"  # nothing listens on port 1
    autoscaler = LocalAutoscaler(
        {Pool.DECODE: policy}, url, "m", serve, {Pool.DECODE: 1}, 0, lines.append
    )
    thread = run(autoscaler, stop)
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()
    assert serve.reads == 3 and serve.scale_calls == []
    assert lines == [
        f"autoscaler: reading metrics failed (MetricsUnavailable: no /metrics endpoint "
        f"answered: {url}); retrying every 0 s"
    ]
