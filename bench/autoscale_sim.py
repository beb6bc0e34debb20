"""Autoscaling simulation: the policy engine against a static pool sized for the peak.

    python bench/autoscale_sim.py                      # step, ramp, bursty; bench/autoscale_sim.png
    python bench/autoscale_sim.py --trace bursty --duration 3600

Each trace is replayed through `operators.simulator` (the same engine and `behavior`
rules as the operator and `baton serve --policy`) twice: once autoscaled between the
policies' bounds, once with both pools fixed at the smallest size that meets the SLO at
the trace's peak. Per trace it prints

* SLO attainment: intervals where prefill's p90 TTFT (with decode's KV pull) and
  decode's p90 ITL met their objectives, among the intervals where the pools at their
  maximum size would have met them (where the load is beyond what max replicas serve,
  no policy can help);
* replica-seconds of both pools, autoscaled and static;
* direction changes (up after down or down after up) of each pool, and the shortest
  time between two of them, against the scale-down stabilization window.

Targets: attainment >= 95%, at most one direction change per stabilization window,
fewer replica-seconds than the static pool.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

from operators.pool_policy import (
    Behavior,
    Capacity,
    Objectives,
    PolicyType,
    Pool,
    PoolPolicy,
    ScalingPolicy,
    ScalingRules,
)
from operators.simulator import TRACES, Simulator, Tick

INTERVAL_S = 15.0
DOWN_WINDOW_S = 180
TTFT_SLO_S, ITL_SLO_S = 1.0, 0.05
# The objectives aim below the SLO: HPA's 10% tolerance band and one interval of
# reaction time must still fit under it.
BEHAVIOR = Behavior(
    scale_up=ScalingRules(
        0,
        (ScalingPolicy(PolicyType.PERCENT, 100, 15), ScalingPolicy(PolicyType.PODS, 4, 15)),
    ),
    scale_down=ScalingRules(DOWN_WINDOW_S, (ScalingPolicy(PolicyType.PERCENT, 50, 60),)),
)
POLICIES = {
    Pool.PREFILL: PoolPolicy(
        Pool.PREFILL,
        1,
        16,
        Objectives(ttft_p90_s=0.8 * TTFT_SLO_S, queue_depth_per_replica=8),
        Capacity(tokens_per_second_per_replica=4000.0, target_utilization=0.6),
        BEHAVIOR,
    ),
    Pool.DECODE: PoolPolicy(
        Pool.DECODE,
        1,
        32,
        Objectives(itl_p90_s=0.8 * ITL_SLO_S),
        Capacity(tokens_per_second_per_replica=400.0, target_utilization=0.8),
        BEHAVIOR,
    ),
}


@dataclass(frozen=True)
class Outcome:
    trace: str
    slo_met: int
    feasible: int
    replica_seconds: float
    static_replicas: dict[Pool, int]
    static_replica_seconds: float
    direction_changes: dict[Pool, int]
    closest_changes_s: float | None  # shortest time between two direction changes

    @property
    def attainment(self) -> float:
        return self.slo_met / self.feasible if self.feasible else 1.0


def slo_met(tick: Tick) -> bool:
    ttft = tick.window.prefill.ttft_p90_s  # the router's TTFT: the KV pull is inside it
    itl = tick.window.decode.itl_p90_s
    return (ttft is None or ttft <= TTFT_SLO_S) and (itl is None or itl <= ITL_SLO_S)


def fixed(size: dict[Pool, int]) -> dict[Pool, PoolPolicy]:
    """The policies, pinned at `size`: a static pool."""
    return {
        pool: replace(policy, min_replicas=size[pool], max_replicas=size[pool])
        for pool, policy in POLICIES.items()
    }


def replica_seconds(ticks: Sequence[Tick]) -> float:
    return sum(sum(t.replicas.values()) * INTERVAL_S for t in ticks)


def static_peak_size(trace: str, duration_s: float) -> dict[Pool, int]:
    """The smallest fixed size of each pool meeting the SLO in every feasible interval."""
    size = {pool: 1 for pool in POLICIES}
    for pool, policy in POLICIES.items():
        others = {p: POLICIES[p].max_replicas for p in POLICIES if p is not pool}
        while size[pool] < policy.max_replicas:
            ticks = run(trace, duration_s, fixed({**others, pool: size[pool]}))
            best = run(trace, duration_s, fixed({**others, pool: policy.max_replicas}))
            if all(slo_met(t) or not slo_met(b) for t, b in zip(ticks, best, strict=True)):
                break
            size[pool] += 1
    return size


def run(trace: str, duration_s: float, policies: dict[Pool, PoolPolicy]) -> list[Tick]:
    return Simulator(policies, interval_s=INTERVAL_S).run(TRACES[trace], duration_s)


def direction_changes(ticks: Sequence[Tick], pool: Pool) -> list[float]:
    """Times at which `pool` started moving the other way."""
    changes, last = [], 0
    for before, after in pairwise(ticks):
        step = after.replicas[pool] - before.replicas[pool]
        if step and last and (step > 0) != (last > 0):
            changes.append(after.at)
        last = step or last
    return changes


def evaluate(trace: str, duration_s: float) -> tuple[Outcome, list[Tick]]:
    ticks = run(trace, duration_s, POLICIES)
    best = run(trace, duration_s, fixed({p: POLICIES[p].max_replicas for p in POLICIES}))
    feasible = [t for t, b in zip(ticks, best, strict=True) if slo_met(b)]
    static = static_peak_size(trace, duration_s)
    changes = {pool: direction_changes(ticks, pool) for pool in POLICIES}
    gaps = [b - a for times in changes.values() for a, b in pairwise(times)]
    outcome = Outcome(
        trace=trace,
        slo_met=sum(slo_met(t) for t in feasible),
        feasible=len(feasible),
        replica_seconds=replica_seconds(ticks),
        static_replicas=static,
        static_replica_seconds=replica_seconds(run(trace, duration_s, fixed(static))),
        direction_changes={pool: len(times) for pool, times in changes.items()},
        closest_changes_s=min(gaps) if gaps else None,
    )
    return outcome, ticks


def table(outcomes: Sequence[Outcome]) -> str:
    head = (
        f"{'trace':8s}{'SLO met':>16s}{'replica-s':>11s}{'static (p+d)':>15s}"
        f"{'static rep-s':>14s}{'saved':>7s}{'dir. changes p/d':>18s}{'closest':>9s}"
    )
    lines = [head, "-" * len(head)]
    for o in outcomes:
        static = f"{o.static_replicas[Pool.PREFILL]}+{o.static_replicas[Pool.DECODE]}"
        changes = f"{o.direction_changes[Pool.PREFILL]}/{o.direction_changes[Pool.DECODE]}"
        closest = "-" if o.closest_changes_s is None else f"{o.closest_changes_s:.0f}s"
        saved = 1 - o.replica_seconds / o.static_replica_seconds
        lines.append(
            f"{o.trace:8s}{f'{o.slo_met}/{o.feasible} {o.attainment:6.1%}':>16s}"
            f"{o.replica_seconds:11.0f}{static:>15s}{o.static_replica_seconds:14.0f}"
            f"{saved:7.0%}{changes:>18s}{closest:>9s}"
        )
    return "\n".join(lines)


def verdicts(o: Outcome) -> list[str]:
    """The targets this outcome misses (empty: all met)."""
    missed = []
    if o.attainment < 0.95:
        missed.append(f"{o.trace}: SLO met in {o.attainment:.1%} of feasible intervals (< 95%)")
    if o.closest_changes_s is not None and o.closest_changes_s < DOWN_WINDOW_S:
        missed.append(
            f"{o.trace}: two direction changes {o.closest_changes_s:.0f}s apart "
            f"(window {DOWN_WINDOW_S}s)"
        )
    if o.replica_seconds >= o.static_replica_seconds:
        missed.append(f"{o.trace}: no fewer replica-seconds than the static peak pool")
    return missed


def plot(runs: Sequence[tuple[Outcome, list[Tick]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for ax, (outcome, ticks) in zip(axes[:, 0], runs, strict=True):
        at = [t.at for t in ticks]
        for pool, style in ((Pool.PREFILL, "-"), (Pool.DECODE, "--")):
            ax.step(at, [t.replicas[pool] for t in ticks], style, where="post", label=f"{pool}")
            static = outcome.static_replicas[pool]
            ax.axhline(static, linestyle=":", linewidth=1, color="grey")
        ax.set_ylabel("replicas")
        ax.set_title(f"{outcome.trace}: SLO met {outcome.attainment:.1%}")
        load = ax.twinx()
        load.plot(at, [t.traffic.request_rate for t in ticks], color="tab:red", alpha=0.4)
        load.set_ylabel("requests/s", color="tab:red")
        ax.legend(loc="upper left")
    axes[-1, 0].set_xlabel("seconds (dotted: the static peak pool)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="+", default=["step", "ramp", "bursty"])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds per trace")
    parser.add_argument("--plot", type=Path, default=Path("bench/autoscale_sim.png"))
    args = parser.parse_args(argv)
    runs = [evaluate(trace, args.duration) for trace in args.trace]
    print(f"{args.duration:.0f} s per trace, {INTERVAL_S:.0f} s intervals\n")
    print(table([o for o, _ in runs]))
    missed = [m for o, _ in runs for m in verdicts(o)]
    print("\n" + ("\n".join(f"MISSED {m}" for m in missed) if missed else "all targets met"))
    plot(runs, args.plot)
    print(f"plot: {args.plot}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
