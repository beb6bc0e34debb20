"""The router's request path (DESIGN.md "Request path") over a prefill and a decode pool,
or a decode pool alone (colocated: decode prefills every prompt itself).

    hashes = block_hashes(prefill fingerprint, prompt, tenant salt)
    stored = longest prefix the KV store's index holds
    uncached <= threshold?  -> decode prefills locally        (skip remote prefill)
    max_remote_prefills in flight already? -> decode prefills locally (conditional
                               disaggregation: the prefill pool's queue is full)
    else                    -> prefill pool: first token + handoff (blocks, lease)
    decode pool: pull the blocks (or recompute), stream the tokens

A prefill that fails or misses its deadline never fails the request: decode prefills
locally instead, and the reason is counted. A decode replica that dies or stalls
mid-stream does not fail it either: the request migrates to another replica, which
re-imports the prompt's blocks from the KV store, replays the tokens already sent and
continues after them; the client sees each token once. A request queued in a busy
replica is not stalled: the replica sends empty outputs while its engine steps. Every
request has a deadline; a stream that cannot finish before it ends with
DeadlineExceededError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from engine.handoff import Handoff
from engine.hashing import block_hashes
from engine.outputs import RequestOutput
from services.pool_requests import DecodeRequest, ModelCard, PoolStats, PrefillRequest
from services.router.errors import (
    ApiError,
    DeadlineExceededError,
    NotReadyError,
    OverloadedError,
)
from services.router.pipeline import GenerationRequest, Pipeline

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1.0
MIGRATION_BACKOFF_S = 0.5  # lets Ray notice a dead replica before the retry is routed
KEEPALIVES_PER_STALL = 4
"""A decode replica's request that waits its turn sends an empty output this many times a
stall timeout while its engine steps (DecodeRequest.keepalive_s): a queue is not a stall."""


class DecodeStalledError(Exception):
    """A decode replica sent nothing for the stall timeout: treated as dead."""


class PrefillPool(Protocol):
    async def prefill(self, request: PrefillRequest) -> Handoff: ...
    async def stats(self) -> list[PoolStats]: ...


class DecodePool(Protocol):
    def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]: ...
    async def stats(self) -> list[PoolStats]: ...


class PrefixIndex(Protocol):
    async def stored_prefix(self, hashes: list[bytes]) -> int: ...

    def release(self, lease_id: str) -> None:
        """Unpins a handoff's lease in the background, trying again while it fails (a
        second release is a no-op); the request never waits for it."""


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
        request_timeout_s: float = 3600.0,
        stall_timeout_s: float = 60.0,
        max_migrations: int = 2,
        max_remote_prefills: int | None = None,
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
        self.vocab_size = min(prefill_card.vocab_size, decode_card.vocab_size)
        self.fingerprint = prefill_card.fingerprint
        self.prefill = prefill
        self.decode = decode
        self.index = index
        self.threshold = local_prefill_threshold
        self.max_remote_prefills = max_remote_prefills
        self.remote_prefills = 0  # sent to the prefill pool, first token not back yet
        self.prefill_timeout_s = prefill_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.local_prefills: Counter[str] = Counter()  # why decode prefilled locally
        self.max_inflight = max_inflight
        self.inflight = 0
        self.request_timeout_s = request_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_migrations = max_migrations
        self.migrations = 0  # requests moved off a failed decode replica
        self.draining = False

    def ready(self) -> bool:
        return not self.draining

    @property
    def max_choices(self) -> int:
        return self.max_inflight

    async def drain(self, timeout_s: float) -> int:
        """Takes no new request (they get 503) and waits up to `timeout_s` for those in
        flight to finish; returns how many were still running."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self.inflight >= self.max_inflight:
            raise OverloadedError(
                f"the server is at its limit of {self.max_inflight} choices in flight (each "
                "prompt x n choice of a request counts one)",
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
        request.params.check_fits(len(prompt), self.max_model_len)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (request.deadline_s or self.request_timeout_s)
        hashes = block_hashes(self.fingerprint, prompt, request.cache_salt)
        stored = await self._stored_prefix(hashes)
        handoff = None
        if self.prefill is None:
            self.local_prefills["colocated"] += 1
        elif len(prompt) - stored * self.fingerprint.block_size <= self.threshold:
            self.local_prefills["short_prompt"] += 1
        elif (
            self.max_remote_prefills is not None
            and self.remote_prefills >= self.max_remote_prefills
        ):
            self.local_prefills["prefill_busy"] += 1
        else:
            timeout = min(self.prefill_timeout_s, deadline - loop.time())
            self.remote_prefills += 1
            try:
                handoff = await self._remote_prefill(request, hashes, stored, timeout)
            finally:
                self.remote_prefills -= 1
        first_token_pool = "decode" if handoff is None else "prefill"
        finished = False
        try:
            # Closed here, not when collected: its cleanup aborts the decode request.
            async with contextlib.aclosing(
                self._decode(request, handoff, hashes, stored, deadline)
            ) as outputs:
                async for out in outputs:
                    finished = out.finished
                    out.first_token_pool = first_token_pool
                    yield out
        finally:
            if not finished and handoff is not None and handoff.lease_id:
                # Abandoned (cancelled, past its deadline, failed) maybe before any decode
                # replica pulled the handoff: only a pull releases its lease, so the prompt's
                # blocks would stay pinned in the store for the lease's whole TTL.
                self._release(handoff.lease_id)

    async def _decode(
        self,
        request: GenerationRequest,
        handoff: Handoff | None,
        hashes: list[bytes],
        stored: int,
        deadline: float,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The decode pool's outputs, moved to another replica if one fails mid-stream."""
        loop = asyncio.get_running_loop()
        prompt = request.prompt_token_ids
        sent: list[int] = []  # tokens the client has
        cached_tokens: int | None = None
        attempt = 0
        while True:
            decode_request = DecodeRequest(
                request.request_id if attempt == 0 else f"{request.request_id}~{attempt}",
                prompt,
                request.params,
                request.cache_salt,
                handoff,
                self.transfer_timeout_s,
                output_prefix=list(sent),
                # A prompt that skipped remote prefill still reads what the store holds.
                stored_hashes=hashes[:stored] if handoff is None else [],
                stored_fingerprint=self.fingerprint if handoff is None and stored else None,
                keepalive_s=self.stall_timeout_s / KEEPALIVES_PER_STALL,
            )
            stream = self.decode.generate(decode_request)
            try:
                async for out in self._within_deadlines(stream, deadline):
                    new = out.num_output_tokens - len(sent)
                    if new <= 0:  # what the client has, replayed after a migration
                        if not out.finished:
                            continue
                        out.new_token_ids, out.new_text, out.logprobs = [], "", []
                    elif len(out.new_token_ids) > new:
                        out.new_token_ids = out.new_token_ids[-new:]
                        out.logprobs = out.logprobs[-new:]
                    if cached_tokens is None:
                        cached_tokens = out.num_cached_tokens
                    out.num_cached_tokens = cached_tokens  # as the first replica saw it
                    out.request_id = request.request_id
                    sent += out.new_token_ids
                    yield out
                return
            except (ValueError, ApiError):
                raise  # the request's own fault, or its deadline: migrating cannot help
            except Exception as e:
                if attempt >= self.max_migrations:
                    if isinstance(e, DecodeStalledError):  # no replica could serve it
                        raise NotReadyError(
                            f"no decode replica served the request ({attempt + 1} tried): {e}"
                        ) from e
                    raise
                attempt += 1
                self.migrations += 1
                log.warning(
                    "request %s: decode failed after %d tokens (%r); migrating",
                    request.request_id,
                    len(sent),
                    e,
                )
            finally:
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
            await asyncio.sleep(min(MIGRATION_BACKOFF_S, max(0.0, deadline - loop.time())))

    def _release(self, lease_id: str) -> None:
        if self.index is not None:
            self.index.release(lease_id)

    async def _within_deadlines(
        self, stream: AsyncIterator[RequestOutput], deadline: float
    ) -> AsyncIterator[RequestOutput]:
        """`stream`'s outputs; DeadlineExceededError past the request's deadline,
        DecodeStalledError when the replica sends nothing for the stall timeout once it
        has taken the request up (its first output, empty: before it, the request may wait
        for a replica in the deployment handle's queue, which is no stall)."""
        loop = asyncio.get_running_loop()
        taken_up = False
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise DeadlineExceededError("the request did not finish before its deadline")
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the output
                # when the caller is cancelled just as it arrives, losing the client's cancel.
                async with asyncio.timeout(min(left, self.stall_timeout_s) if taken_up else left):
                    out = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not taken_up or loop.time() >= deadline:
                    raise DeadlineExceededError(
                        "the request did not finish before its deadline"
                    ) from None
                raise DecodeStalledError(
                    f"no output for {self.stall_timeout_s:g} s from the decode replica"
                ) from None
            taken_up = True
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
        self, request: GenerationRequest, hashes: list[bytes], stored: int, timeout_s: float
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
        handed_over = False  # or refused: either way no lease is left for the router
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see _within_deadlines
                handoff = await self.prefill.prefill(prefill_request)
            handed_over = True
            return handoff
        except ValueError:
            handed_over = True  # refused before running: it exported nothing to release
            raise  # the prompt itself is bad: no pool can serve it
        except TimeoutError:
            self.local_prefills["prefill_timeout"] += 1
        except Exception as e:
            log.warning("request %s: prefill failed, decode prefills: %s", request.request_id, e)
            self.local_prefills["prefill_error"] += 1
        finally:
            if not handed_over:
                # Given up on (timed out, failed, cancelled), the prefill may have exported
                # all the same, and its answer, the only other copy of the lease id, is
                # dropped: release the lease now rather than at its TTL.
                self._release(prefill_request.lease_id)
        return None
