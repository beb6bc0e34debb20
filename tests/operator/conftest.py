"""Fixtures for the operator tests: an emulated cluster, a replica's /metrics, a hand clock,
and the real kopf operator running against them in the test's event loop."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kmock
import kopf
import pytest

from operators.handlers import OperatorConfig, build_registry
from tests.operator.cluster import Cluster
from tests.operator.telemetry_page import TelemetryPage

INTERVAL_S = 0.1  # timer interval: real seconds between reconciles of a policy
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z; the hand clock starts here


class HandClock:
    """Policy time that moves only when a test says so: stabilization windows of
    minutes pass in one call, and nothing depends on how fast this machine is."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as handler, kmock.Server(handler):
        handler.declare_baton_resources()
        yield handler


@pytest.fixture
async def telemetry() -> AsyncIterator[TelemetryPage]:
    page = TelemetryPage()
    await page.start()
    yield page
    await page.stop()


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


@pytest.fixture
async def operator(cluster: Cluster, clock: HandClock) -> AsyncIterator[None]:
    """`baton operator --all-namespaces --standalone`, as `operators.main` runs it.

    In a thread with its own event loop, as in production: kopf owns its loop and, when
    stopping, waits for every task in it (the test's would count as hung)."""
    config = OperatorConfig(
        interval_s=INTERVAL_S,
        clock=clock,
        connection=kopf.ConnectionInfo(server=str(cluster.url)),
    )
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    stop, ready = threading.Event(), threading.Event()
    run = functools.partial(
        kopf.operator,
        registry=build_registry(config),
        settings=settings,
        clusterwide=True,  # kmock 0.8 cannot list namespaces, which namespaced mode needs
        standalone=True,
        stop_flag=stop,
        ready_flag=ready,
        memo=kopf.Memo(),
    )
    thread = threading.Thread(target=lambda: asyncio.run(run()), name="operator")
    thread.start()
    assert await asyncio.to_thread(ready.wait, 30), "the operator did not start"
    yield
    stop.set()
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "the operator did not stop"


async def eventually(check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy; fail with its last answer."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met in {timeout_s}s; last: {result!r}")
        await asyncio.sleep(0.02)
