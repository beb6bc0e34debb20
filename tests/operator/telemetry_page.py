"""TelemetryPage: one replica's `/metrics`, served over real HTTP, with values a test sets.

The series are DESIGN.md "Telemetry"'s, made by prometheus_client, so the operator reads
the same text format (and `_bucket`/`_total`/`_created` samples) a Baton worker exposes.
"""

from __future__ import annotations

from typing import Any

import aiohttp.web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's TTFT buckets (DESIGN.md asks for vLLM's)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class TelemetryPage:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("pool", "model")
        kw: dict[str, Any] = {"labelnames": labels, "registry": self.registry}
        self.ttft = Histogram(
            "baton_time_to_first_token_seconds", "TTFT", buckets=TTFT_BUCKETS, **kw
        )
        self.itl = Histogram("baton_inter_token_latency_seconds", "ITL", buckets=ITL_BUCKETS, **kw)
        self.kv_transfer = Histogram("baton_kv_transfer_seconds", "KV pull", **kw)
        self.waiting = Gauge("baton_num_requests_waiting", "waiting", **kw)
        self.running = Gauge("baton_num_requests_running", "running", **kw)
        self.kv_usage = Gauge("baton_kv_cache_usage_ratio", "KV use", **kw)
        self.prompt_tokens = Counter("baton_prompt_tokens", "prompt tokens", **kw)
        self.generation_tokens = Counter("baton_generation_tokens", "generated tokens", **kw)
        self.requests = 0  # how many times /metrics was read
        self._runner: aiohttp.web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/metrics"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        self.requests += 1
        return aiohttp.web.Response(
            body=generate_latest(self.registry), content_type="text/plain", charset="utf-8"
        )
