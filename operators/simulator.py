"""Simulator: replay a traffic trace through the policy engine and show replicas over time.

A deliberately small, deterministic model of the two pools (no randomness, so a test
can pin the exact replica sequence): each replica of a pool serves a fixed number of
tokens per second; demand beyond that queues as a backlog; latency grows with
utilization and with the backlog; decode's concurrent sequences follow Little's law.
Desired replicas take effect at the next tick (a replica needs time to come up).

    python -m operators.simulator --trace step     # prints one line per tick
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from operators.autoscaler import Autoscaler
from operators.metrics_window import MetricsWindow, PoolMetrics
from operators.pool_policy import Capacity, Objectives, Pool, PoolPolicy


@dataclass(frozen=True)
class Traffic:
    """Load from time `at` on: requests/s and the mean prompt/output length."""

    at: float
    request_rate: float
    prompt_tokens: float
    output_tokens: float


@dataclass(frozen=True)
class ServiceModel:
    prefill_tokens_per_s: float = 4000.0  # one prefill replica, prompt tokens
    decode_tokens_per_s: float = 400.0  # one decode replica, generated tokens
    base_itl_s: float = 0.02
    kv_transfer_s: float = 0.05


@dataclass(frozen=True)
class Tick:
    at: float
    traffic: Traffic
    window: MetricsWindow
    replicas: dict[Pool, int]  # serving during this tick
    desired: dict[Pool, int]  # decided at the end of it


class Simulator:
    def __init__(
        self,
        policies: Mapping[Pool, PoolPolicy],
        model: ServiceModel = ServiceModel(),
        interval_s: float = 15.0,
    ) -> None:
        self.policies = dict(policies)
        self.model = model
        self.interval_s = interval_s

    def run(self, trace: Sequence[Traffic], duration_s: float) -> list[Tick]:
        autoscaler = Autoscaler(self.policies)
        replicas = {pool: policy.min_replicas for pool, policy in self.policies.items()}
        backlog = {Pool.PREFILL: 0.0, Pool.DECODE: 0.0}  # tokens not yet served
        ticks: list[Tick] = []
        at = 0.0
        while at < duration_s:
            traffic = max((t for t in trace if t.at <= at), key=lambda t: t.at)
            window = self._observe(traffic, replicas, backlog)
            decisions = autoscaler.step(window, replicas, at + self.interval_s)
            desired = {pool: d.desired_replicas for pool, d in decisions.items()}
            ticks.append(Tick(at, traffic, window, dict(replicas), desired))
            for decision in decisions.values():
                if decision.changes:
                    autoscaler.applied(decision, at + self.interval_s)
            replicas = desired
            at += self.interval_s
        return ticks

    def _observe(
        self, traffic: Traffic, replicas: Mapping[Pool, int], backlog: dict[Pool, float]
    ) -> MetricsWindow:
        m, dt = self.model, self.interval_s
        prefill_n = replicas.get(Pool.PREFILL, 1)
        decode_n = replicas.get(Pool.DECODE, 1)
        tokens_in = traffic.request_rate * traffic.prompt_tokens
        tokens_out = traffic.request_rate * traffic.output_tokens
        served_in = self._serve(
            Pool.PREFILL, tokens_in, prefill_n * m.prefill_tokens_per_s, backlog
        )
        served_out = self._serve(Pool.DECODE, tokens_out, decode_n * m.decode_tokens_per_s, backlog)
        rho_in = min(tokens_in / (prefill_n * m.prefill_tokens_per_s), 0.95)
        rho_out = min(tokens_out / (decode_n * m.decode_tokens_per_s), 0.95)
        prefill_s = traffic.prompt_tokens / m.prefill_tokens_per_s
        itl = m.base_itl_s * (1 + rho_out)
        sequences = tokens_out * itl  # Little: sequences in flight = arrivals x time in system
        return MetricsWindow(
            prefill=PoolMetrics(
                ttft_p90_s=prefill_s / (1 - rho_in)
                + backlog[Pool.PREFILL] / max(served_in / dt, 1)
                + m.kv_transfer_s,  # the router's TTFT waits for decode's KV pull
                requests_waiting=backlog[Pool.PREFILL] / max(traffic.prompt_tokens, 1),
                request_rate=traffic.request_rate,
                prompt_tokens_per_s=served_in / dt,
            ),
            decode=PoolMetrics(
                itl_p90_s=itl + backlog[Pool.DECODE] / max(served_out / dt, 1) / 100,
                kv_transfer_p90_s=m.kv_transfer_s,
                requests_waiting=backlog[Pool.DECODE] / max(traffic.output_tokens, 1),
                requests_running=sequences,
                generation_tokens_per_s=served_out / dt,
            ),
        )

    def _serve(
        self, pool: Pool, demand: float, capacity: float, backlog: dict[Pool, float]
    ) -> float:
        """Tokens served this tick; the rest is added to (or drained from) the backlog."""
        offered = demand * self.interval_s + backlog[pool]
        served = min(offered, capacity * self.interval_s)
        backlog[pool] = offered - served
        return served


def format_ticks(ticks: Sequence[Tick]) -> str:
    lines = [f"{'t(s)':>6} {'req/s':>6} {'in tok':>7} {'out tok':>7} {'prefill':>8} {'decode':>7}"]
    for t in ticks:
        lines.append(
            f"{t.at:6.0f} {t.traffic.request_rate:6.1f} {t.traffic.prompt_tokens:7.0f} "
            f"{t.traffic.output_tokens:7.0f} {t.replicas.get(Pool.PREFILL, 0):8d} "
            f"{t.replicas.get(Pool.DECODE, 0):7d}"
        )
    return "\n".join(lines)


TRACES: dict[str, list[Traffic]] = {
    "step": [Traffic(0, 2, 1000, 200), Traffic(120, 12, 1000, 200), Traffic(480, 2, 1000, 200)],
    # 1 -> 10 req/s in 10 minutes, and back down in the next 10
    "ramp": [Traffic(float(t), 1 + min(t, 1200 - t) / 60, 1000, 200) for t in range(0, 1260, 60)],
    "mix": [Traffic(0, 6, 400, 400), Traffic(300, 6, 3000, 50)],
    # a 2 req/s floor with a one-minute burst to 10 req/s every 15 minutes
    "bursty": [
        Traffic(float(t + dt), rate, 1000, 200)
        for t in range(0, 3600, 900)
        for dt, rate in ((0, 2), (600, 10), (660, 2))
    ],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", choices=sorted(TRACES), default="step")
    parser.add_argument("--duration", type=float, default=900.0)
    args = parser.parse_args(argv)
    policies = {
        Pool.PREFILL: PoolPolicy(Pool.PREFILL, 1, 16, Objectives(ttft_p90_s=1.0), Capacity(4000.0)),
        Pool.DECODE: PoolPolicy(Pool.DECODE, 1, 32, Objectives(itl_p90_s=0.05), Capacity(400.0)),
    }
    print(format_ticks(Simulator(policies).run(TRACES[args.trace], args.duration)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
