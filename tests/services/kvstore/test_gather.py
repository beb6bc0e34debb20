"""gather_or_cancel: a failed transfer leaves no sibling running past its caller's error."""

from __future__ import annotations

import asyncio

import pytest

from services.kvstore.gather import gather_or_cancel


async def test_a_failure_cancels_and_awaits_the_others_before_it_propagates() -> None:
    """asyncio.gather raises while the others still run: a put streaming engine blocks the
    caller frees on that error (the review saw it read freed blocks 0.3 s later)."""
    touched: list[str] = []

    async def fail_fast() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("lease refused")

    async def slow_put() -> None:
        try:
            await asyncio.sleep(0.5)
            touched.append("read the blocks")
        finally:
            touched.append("stopped")

    with pytest.raises(RuntimeError, match="lease refused"):
        await gather_or_cancel(fail_fast(), slow_put())
    assert touched == ["stopped"]  # stopped before the caller saw the error, never read
    await asyncio.sleep(0.6)
    assert touched == ["stopped"]


async def test_results_keep_their_order() -> None:
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert await gather_or_cancel(value(1, 0.02), value(2, 0.0)) == [1, 2]
