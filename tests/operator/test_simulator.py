"""The simulator replays traces through the engine: step limits, windows, traffic mix."""

from __future__ import annotations

import pytest

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
from operators.simulator import TRACES, Simulator, Traffic, main

DECODE = PoolPolicy(
    Pool.DECODE,
    1,
    20,
    Objectives(queue_depth_per_replica=4),
    Capacity(tokens_per_second_per_replica=400.0),
    Behavior(
        scale_up=ScalingRules(0, (ScalingPolicy(PolicyType.PODS, 2, 60),)),
        scale_down=ScalingRules(120, (ScalingPolicy(PolicyType.PODS, 1, 30),)),
    ),
)
STEP = [Traffic(0, 2, 1000, 200), Traffic(120, 12, 1000, 200), Traffic(480, 2, 1000, 200)]


def test_step_trace_shows_step_limits_and_the_down_window() -> None:
    ticks = Simulator({Pool.DECODE: DECODE}, interval_s=30).run(STEP, 900)
    sizes = [t.replicas[Pool.DECODE] for t in ticks]
    # load x6 at t=120: the queue asks for far more, +2 pods per 60 s lets 2 in at a time;
    # the backlog drained, 8 replicas carry the load; the load falls at t=480, but 8 was
    # recommended within the 120 s down-window, then -1 pod per 30 s down to 2
    assert sizes[:16] == [1, 2, 2, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 10, 10, 10]  # t=0..450
    assert sizes[16:] == [9, 8, 8, 8, 7, 6, 5, 4, 3, 2, 2, 2, 2, 2]  # t=480..870
    for i in range(len(sizes) - 2):  # the policies, checked over every 60 s of the run
        assert sizes[i + 2] - sizes[i] <= 2
        assert sizes[i] - sizes[i + 1] <= 1


def test_pools_follow_a_traffic_mix_shift() -> None:
    quick = Behavior(scale_down=ScalingRules(60, (ScalingPolicy(PolicyType.PERCENT, 100, 15),)))
    policies = {
        Pool.PREFILL: PoolPolicy(Pool.PREFILL, 1, 16, capacity=Capacity(4000.0), behavior=quick),
        Pool.DECODE: PoolPolicy(Pool.DECODE, 1, 32, capacity=Capacity(400.0), behavior=quick),
    }
    ticks = Simulator(policies, interval_s=15).run(TRACES["mix"], 900)
    before = ticks[19].replicas  # t=285: 6 req/s of 400 in / 400 out tokens
    after = ticks[-1].replicas  # t=885: the same requests, 3000 in / 50 out
    # tokens/s over 80% of a replica's rate: 2400/3200 -> 1 and 2400/320 -> 8, then
    # 18000/3200 -> 6 and 300/320 -> 1
    assert (before[Pool.PREFILL], before[Pool.DECODE]) == (1, 8)
    assert (after[Pool.PREFILL], after[Pool.DECODE]) == (6, 1)


@pytest.mark.parametrize("trace", sorted(TRACES))
def test_main_prints_replicas_over_time(trace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--trace", trace, "--duration", "150"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["t(s)", "req/s", "in", "tok", "out", "tok", "prefill", "decode"]
    assert [line.split()[0] for line in lines[1:]] == [str(t) for t in range(0, 150, 15)]
