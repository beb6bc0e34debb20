"""How the router reaches the pools: in-process workers, or Ray Serve deployment handles.

Both satisfy the `PrefillPool`/`DecodePool` protocols of `services.router.disaggregated`,
so the request path is the same code with and without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ray.serve import context as serve_context

from engine.handoff import Handoff
from engine.outputs import RequestOutput
from services.decode.server import DecodeServer
from services.kvstore.client import KVStoreClient
from services.kvstore.lease_releaser import LeaseReleaser
from services.pool_requests import DecodeRequest, PoolStats, PrefillRequest
from services.prefill.server import PrefillServer
from services.telemetry import Snapshot


class LocalPrefillPool:
    def __init__(self, *servers: PrefillServer) -> None:
        self.servers = servers
        self._next = 0

    async def prefill(self, request: PrefillRequest) -> Handoff:
        server = self.servers[self._next % len(self.servers)]
        self._next += 1
        return await server.prefill(request)

    async def stats(self) -> list[PoolStats]:
        return [await s.stats() for s in self.servers]

    async def metrics(self) -> list[Snapshot]:
        return [await s.metrics() for s in self.servers]


class LocalDecodePool:
    def __init__(self, *servers: DecodeServer) -> None:
        self.servers = servers
        self._next = 0

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        server = self.servers[self._next % len(self.servers)]
        self._next += 1
        async for out in server.generate(request):
            yield out

    async def stats(self) -> list[PoolStats]:
        return [await s.stats() for s in self.servers]

    async def metrics(self) -> list[Snapshot]:
        return [await s.metrics() for s in self.servers]


class RayPrefillPool:
    """A `prefill` deployment handle; its request router picks the replica."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def prefill(self, request: PrefillRequest) -> Handoff:
        with _own_call_id():
            response = self.handle.prefill.remote(request)
        try:
            handoff: Handoff = await response
        except asyncio.CancelledError:  # a deadline or a hang-up: stop the replica's work
            response.cancel()
            raise
        return handoff

    async def stats(self) -> list[PoolStats]:
        return await _every_replica(self.handle, "stats")

    async def metrics(self) -> list[Snapshot]:
        return await _every_replica(self.handle, "metrics")


class RayDecodePool:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        with _own_call_id():
            stream = self.handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
        finally:
            if not finished:
                stream.cancel()  # the replica's generator is cancelled: it aborts the request

    async def stats(self) -> list[PoolStats]:
        return await _every_replica(self.handle, "stats")

    async def metrics(self) -> list[Snapshot]:
        return await _every_replica(self.handle, "metrics")


@contextlib.contextmanager
def _own_call_id() -> Iterator[None]:
    """Gives the handle call made inside its own internal request id.

    Ray Serve tags a handle call with the calling request's internal id and its request
    router matches routed replicas to pending calls by that id, so the concurrent pool
    calls of one HTTP request (the choices of `n > 1`) would share one id and all but one
    would wait unrouted forever. Ray has no public switch for this; the context is its.
    """
    var: contextvars.ContextVar[Any] = serve_context._serve_request_context
    current = serve_context._get_serve_request_context()
    token = var.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        yield
    finally:
        var.reset(token)


async def _every_replica(handle: Any, method: str) -> list[Any]:
    results: list[Any] = await handle.broadcast(method).results_async(timeout_s=5)
    return results


class StorePrefixIndex:
    """The KV store's prefix index, as the router asks it."""

    def __init__(self, client: KVStoreClient, releaser: LeaseReleaser | None = None) -> None:
        self.client = client
        self.releaser = releaser or LeaseReleaser()

    async def stored_prefix(self, hashes: list[bytes]) -> int:
        return len(await self.client.lookup(hashes))

    def release(self, lease_id: str) -> None:
        self.releaser.release_in_background(self.client, lease_id)

    async def close(self) -> None:
        await self.releaser.close()  # before the client its releases use
        await self.client.close()
