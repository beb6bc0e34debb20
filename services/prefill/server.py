"""PrefillServer: the `prefill` deployment. FP8 GEMMs, chunked prefill batching every
prompt it holds, cached prefixes pulled from the KV store, new full blocks pushed to it."""

from __future__ import annotations

import logging

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
        engine = self.engine.engine
        fingerprint = engine.fingerprint
        hashes = request.block_hashes
        pinned: list[int] = []
        if self.bridge is not None and request.stored_prefix:
            pinned = await self._fetch(hashes[: request.stored_prefix])
        last = None
        async for out in self.engine.generate(
            request.prompt_token_ids,
            prefill_params(request.params),
            request.request_id,
            cache_salt=request.cache_salt,
            pinned_blocks=pinned,
            hold_prompt_blocks=True,
        ):
            last = out
        assert last is not None and last.finished
        port = engine.port
        lease_id = ""
        block_hashes = [h for h, _ in self.engine.call(lambda _: port.held(request.request_id))]
        try:
            if self.bridge is not None and block_hashes:
                lease = await self.bridge.export(
                    fingerprint, request.request_id, request.stored_prefix
                )
                lease_id = lease.lease_id
        except Exception as e:  # the KV store is an optimization: never fail a request on it
            log.warning("request %s: KV export failed: %s", request.request_id, e)
            self.fallbacks["kv_export"] += 1
            block_hashes = []
        finally:
            self.engine.call(lambda _: port.release_held(request.request_id))
        if self.bridge is None:
            block_hashes = []
        return Handoff(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            first_token=last.new_token_ids[0],
            first_logprobs=last.logprobs[0] if last.logprobs else None,
            fingerprint=fingerprint,
            block_hashes=block_hashes,
            num_cached_tokens=last.num_cached_tokens,
            lease_id=lease_id,
        )

    async def _fetch(self, hashes: list[bytes]) -> list[int]:
        assert self.bridge is not None
        try:
            return await self.bridge.fetch(self.engine.engine.fingerprint, hashes)
        except Exception as e:  # the KV store is an optimization: never fail a request on it
            log.warning("cached prefix fetch failed, recomputing it: %s", e)
            return []
