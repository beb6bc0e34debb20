"""MetricsEndpoint: a shard's GET /metrics (`baton kvstore --metrics-port`), Prometheus text.

The same counters and arena gauges the Stats RPC returns, plus the histogram of transfer
durations (`baton_kv_transfer_seconds{direction, transport}`), all `pool="kvstore"`.
"""

from __future__ import annotations

import aiohttp.web

from services.kvstore.metrics import PUBLISHED, readings
from services.kvstore.store import BlockStore
from services.telemetry import KV_TRANSFER_SECONDS, Telemetry


class MetricsEndpoint:
    def __init__(self, store: BlockStore, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.telemetry = Telemetry("kvstore", metrics=PUBLISHED)
        self.telemetry.observe(lambda: readings(store.samples()))
        store.metrics.transfer_observers.append(self._transferred)
        self._runner: aiohttp.web.AppRunner | None = None

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._page)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the one bound, for an ephemeral port 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _transferred(self, direction: str, transport: str, seconds: float) -> None:
        labels = {"direction": direction, "transport": transport}
        self.telemetry.record(KV_TRANSFER_SECONDS, seconds, **labels)

    async def _page(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(
            text=self.telemetry.render(), content_type="text/plain", charset="utf-8"
        )
