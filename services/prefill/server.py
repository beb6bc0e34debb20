"""PrefillServer: the `prefill` deployment. FP8 GEMMs, chunked prefill batching every
prompt it holds, cached prefixes pulled from the KV store, new full blocks pushed to it."""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import trace

from engine.async_engine import RequestRefused
from engine.handoff import Handoff, prefill_params
from services.pool_requests import PrefillRequest
from services.pool_worker import PoolWorker

log = logging.getLogger(__name__)


class PrefillServer(PoolWorker):
    pool = "prefill"

    async def prefill(self, request: PrefillRequest) -> Handoff:
        """Compute the prompt's KV and first token; publish the blocks; return the handoff.

        Raises ValueError for prompts the model cannot take. KV store trouble never fails
        the request: the handoff then names no blocks and decode recomputes the prompt.
        """
        with trace.use_span(self.begin(request), end_on_exit=True) as span:
            handoff = await self._prefill(request)
            span.set_attributes(
                {
                    "gen_ai.usage.output_tokens": 1,
                    "baton.cached_tokens": handoff.num_cached_tokens,
                    "baton.kv.handoff_blocks": len(handoff.block_hashes),
                }
            )
            return handoff

    async def _prefill(self, request: PrefillRequest) -> Handoff:
        engine = self.engine.engine
        fingerprint = engine.fingerprint
        port = engine.port
        rid = request.request_id
        pinned: list[int] = []
        if self.bridge is not None and request.stored_prefix:
            pinned = await self._fetch(request.block_hashes[: request.stored_prefix])
        last = None
        lease_id = ""
        refused = False
        try:
            async for out in self.engine.generate(
                request.prompt_token_ids,
                prefill_params(request.params),
                rid,
                cache_salt=request.cache_salt,
                pinned_blocks=pinned,
                hold_prompt_blocks=True,
            ):
                last = out
            if last is None or not last.new_token_ids:  # aborted before its first token
                reason = "no output" if last is None else last.finish_reason
                raise RuntimeError(f"request {rid}: prefill ended without a token ({reason})")
            block_hashes = [h for h, _ in await self.engine.acall(lambda _: port.held(rid))]
            if self.bridge is None:
                block_hashes = []
            elif block_hashes:
                lease_id = await self._export(rid, request.stored_prefix, request.lease_id)
                if not lease_id:
                    block_hashes = []
        except RequestRefused:
            refused = True  # never queued: the id may be another request's
            raise
        except asyncio.CancelledError:
            # The router gave up (deadline): hand nothing over, pin nothing in the store.
            if lease_id and self.bridge is not None:
                self.bridge.release(fingerprint, lease_id)
            raise
        finally:
            # Whether the request finished, failed or was cancelled mid-way: a request that
            # finished before its output was read still holds its prompt blocks.
            if not refused:
                await self.engine.acall(lambda _: port.release_held(rid))
        return Handoff(
            request_id=rid,
            prompt_token_ids=request.prompt_token_ids,
            first_token=last.new_token_ids[0],
            first_logprobs=last.logprobs[0] if last.logprobs else None,
            fingerprint=fingerprint,
            block_hashes=block_hashes,
            num_cached_tokens=last.num_cached_tokens,
            lease_id=lease_id,
        )

    async def _export(self, request_id: str, stored_prefix: int, lease_id: str) -> str:
        """The lease pinning the prompt's blocks in the store, or "" if the store failed."""
        assert self.bridge is not None
        try:
            lease = await self.bridge.export(
                self.engine.engine.fingerprint, request_id, stored_prefix, lease_id
            )
            return lease.lease_id
        except Exception as e:  # the KV store is an optimization: never fail a request on it
            log.warning("request %s: KV export failed: %s", request_id, e)
            self.fallbacks["kv_export"] += 1
            return ""

    async def _fetch(self, hashes: list[bytes]) -> list[int]:
        assert self.bridge is not None
        try:
            return await self.bridge.fetch(self.engine.engine.fingerprint, hashes)
        except Exception as e:  # the KV store is an optimization: never fail a request on it
            log.warning("cached prefix fetch failed, recomputing it: %s", e)
            return []
