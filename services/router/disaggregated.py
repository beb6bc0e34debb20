"""The router's request path (DESIGN.md "Request path") over a prefill and a decode pool,
or a decode pool alone (colocated: decode prefills every prompt itself).

    hashes = block_hashes(prefill fingerprint, prompt, tenant salt)
    stored = longest prefix the KV store's index holds
    uncached <= threshold?  -> decode prefills locally        (skip remote prefill)
    else                    -> prefill pool: first token + handoff (blocks, lease)
    decode pool: pull the blocks (or recompute), stream the tokens

A prefill that fails or misses its deadline never fails the request: decode prefills
locally instead, and the reason is counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Protocol

from engine.handoff import Handoff
from engine.hashing import block_hashes
from engine.outputs import RequestOutput
from services.pool_requests import DecodeRequest, ModelCard, PoolStats, PrefillRequest
from services.router.errors import OverloadedError
from services.router.pipeline import GenerationRequest, Pipeline

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1.0


class PrefillPool(Protocol):
    async def prefill(self, request: PrefillRequest) -> Handoff: ...
    async def stats(self) -> list[PoolStats]: ...


class DecodePool(Protocol):
    def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]: ...
    async def stats(self) -> list[PoolStats]: ...


class PrefixIndex(Protocol):
    async def stored_prefix(self, hashes: list[bytes]) -> int: ...


class DisaggregatedPipeline(Pipeline):
    def __init__(
        self,
        prefill_card: ModelCard,
        decode_card: ModelCard,
        prefill: PrefillPool | None,
        decode: DecodePool,
        index: PrefixIndex | None,
        local_prefill_threshold: int,
        prefill_timeout_s: float,
        transfer_timeout_s: float,
        max_inflight: int = 256,
    ) -> None:
        if prefill_card.model_id != decode_card.model_id:
            raise ValueError(
                f"prefill serves {prefill_card.model_id!r} but decode {decode_card.model_id!r}"
            )
        if prefill_card.fingerprint.weights_digest != decode_card.fingerprint.weights_digest:
            raise ValueError("prefill and decode pools loaded different weights")
        self.model_id = decode_card.model_id
        self.tokenizer = decode_card.tokenizer
        self.max_model_len = min(prefill_card.max_model_len, decode_card.max_model_len)
        self.fingerprint = prefill_card.fingerprint
        self.prefill = prefill
        self.decode = decode
        self.index = index
        self.threshold = local_prefill_threshold
        self.prefill_timeout_s = prefill_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.local_prefills: Counter[str] = Counter()  # why decode prefilled locally
        self.max_inflight = max_inflight
        self.inflight = 0

    def ready(self) -> bool:
        return True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self.inflight >= self.max_inflight:
            raise OverloadedError(
                f"the server is at its limit of {self.max_inflight} requests in flight",
                retry_after_s=RETRY_AFTER_S,
            )
        self.inflight += 1
        try:
            async for out in self._generate(request):
                yield out
        finally:
            self.inflight -= 1

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        prompt = request.prompt_token_ids
        needed = len(prompt) + request.params.max_tokens
        if needed > self.max_model_len:
            raise ValueError(
                f"this model's context window is {self.max_model_len} tokens, but the request "
                f"needs {needed} ({len(prompt)} in the prompt, {request.params.max_tokens} "
                "for max_tokens); shorten the prompt or lower max_tokens"
            )
        hashes = block_hashes(self.fingerprint, prompt, request.cache_salt)
        stored = await self._stored_prefix(hashes)
        handoff = None
        if self.prefill is None:
            self.local_prefills["colocated"] += 1
        elif len(prompt) - stored * self.fingerprint.block_size <= self.threshold:
            self.local_prefills["short_prompt"] += 1
        else:
            handoff = await self._remote_prefill(request, hashes, stored)
        decode_request = DecodeRequest(
            request.request_id,
            prompt,
            request.params,
            request.cache_salt,
            handoff,
            self.transfer_timeout_s,
        )
        async for out in self.decode.generate(decode_request):
            yield out

    async def _stored_prefix(self, hashes: list[bytes]) -> int:
        if self.index is None or not hashes:
            return 0
        try:
            return await self.index.stored_prefix(hashes)
        except Exception as e:  # an index outage costs cache hits, not requests
            log.warning("prefix index lookup failed: %s", e)
            return 0

    async def _remote_prefill(
        self, request: GenerationRequest, hashes: list[bytes], stored: int
    ) -> Handoff | None:
        assert self.prefill is not None
        prefill_request = PrefillRequest(
            request.request_id,
            request.prompt_token_ids,
            request.params,
            request.cache_salt,
            hashes,
            stored,
        )
        try:
            return await asyncio.wait_for(
                self.prefill.prefill(prefill_request), self.prefill_timeout_s
            )
        except ValueError:
            raise  # the prompt itself is bad: no pool can serve it
        except TimeoutError:
            self.local_prefills["prefill_timeout"] += 1
        except Exception as e:
            log.warning("request %s: prefill failed, decode prefills: %s", request.request_id, e)
            self.local_prefills["prefill_error"] += 1
        return None
