"""gather_or_cancel: asyncio.gather for awaitables that touch the caller's buffers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def gather_or_cancel(*awaitables: Awaitable[Any]) -> list[Any]:
    """The results of every awaitable, in order; if one fails, the others are cancelled
    and awaited before the failure propagates.

    `asyncio.gather` raises the first failure while the others keep running. For
    transfers that read or write engine KV blocks that matters: the caller releases the
    blocks on that error (a put still streaming freed blocks would store another prompt's
    KV under this prompt's hashes; a get still writing would overwrite reused blocks), and
    a put that commits afterwards pins what the caller's cleanup already released.
    """
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
