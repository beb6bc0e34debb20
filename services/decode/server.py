"""DecodeServer: the `decode` deployment. INT4 GEMMs, continuous batching, the handoff's
blocks pulled while other requests keep decoding, local prefill when a handoff fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from opentelemetry import trace

from engine.hashing import KVFingerprint
from engine.outputs import RequestOutput
from services.pool_requests import DecodeRequest
from services.pool_worker import PoolWorker

log = logging.getLogger(__name__)


class DecodeServer(PoolWorker):
    pool = "decode"

    async def generate(self, request: DecodeRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's tokens, starting with the handoff's first token if any.

        With `request.keepalive_s`, the first output is an empty one, sent as soon as this
        replica takes the request up: the router's stall clock starts there, not while
        the request waited for a replica (in the deployment handle's queue)."""
        span = self.begin(request)
        last: RequestOutput | None = None
        if request.keepalive_s is not None:
            yield _keepalive(request)
        try:
            async for out in self._generate(request, span):
                last = out
                yield out
        except Exception as e:
            span.record_exception(e)
            span.set_status(trace.StatusCode.ERROR, repr(e))
            raise
        finally:
            if last is not None:
                span.set_attribute("gen_ai.usage.output_tokens", last.num_output_tokens)
            span.end()

    async def _generate(
        self, request: DecodeRequest, span: trace.Span
    ) -> AsyncIterator[RequestOutput]:
        handoff = request.handoff
        prefix = [handoff.first_token] if handoff is not None else []
        with trace.use_span(span):  # current for the transfer only: this generator yields
            transfer = asyncio.ensure_future(self._transfer(request))
        try:
            # A KV pull can take a while: keepalives say this replica works on it, for up
            # to `transfer_timeout_s`. Past that the pull should have ended; if it has not
            # (a hung engine step holds its release), silence lets the router's stall
            # clock find the replica.
            deadline = asyncio.get_running_loop().time() + request.transfer_timeout_s
            while request.keepalive_s is not None and not transfer.done():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                await asyncio.wait({transfer}, timeout=min(request.keepalive_s, left))
                if not transfer.done():
                    yield _keepalive(request)
            fingerprint, pinned = await transfer
        except BaseException:  # the caller left (or was cancelled) during the transfer
            transfer.cancel()  # a fetch cancelled mid-way holds nothing (KVBridge.fetch)
            await asyncio.gather(transfer, return_exceptions=True)
            if not transfer.cancelled() and transfer.exception() is None:
                _, unused = transfer.result()  # it finished first: give its pins back
                port = self.engine.engine.port
                await self.engine.acall(lambda _: port.release(unused))
            raise
        if request.output_prefix:  # a migrated request resumes after what was streamed
            prefix = list(request.output_prefix)
        cached_override = handoff.num_cached_tokens if handoff is not None else None
        async for out in self.engine.generate(
            request.prompt_token_ids,
            request.params,
            request.request_id,
            cache_salt=request.cache_salt,
            kv_fingerprint=fingerprint,
            output_prefix=prefix,
            prefix_logprobs=[handoff.first_logprobs] if handoff is not None else [],
            pinned_blocks=pinned,
            handed_over=handoff is not None,  # the handoff's blocks; else a stored prefix
            keepalive_s=request.keepalive_s,
        ):
            if cached_override is not None:
                # Prefix-cache hits happened at prefill; decode's import is not a hit.
                out.num_cached_tokens = cached_override
            yield out

    async def _transfer(self, request: DecodeRequest) -> tuple[KVFingerprint | None, list[int]]:
        """The prompt's KV this replica can start from: the handoff's blocks, or the longest
        stored prefix, pinned, with the fingerprint they were computed under."""
        if request.handoff is not None:
            pinned = await self._pull(request)
            return (request.handoff.fingerprint if pinned else None), pinned
        if request.stored_hashes and request.stored_fingerprint is not None:
            pinned = await self._import_stored(request)
            return (request.stored_fingerprint if pinned else None), pinned
        return None, []

    async def _import_stored(self, request: DecodeRequest) -> list[int]:
        """The longest prefix of the stored blocks the store still serves, pinned; the rest
        of the prompt is computed here. A failure costs the import, not the request."""
        assert request.stored_fingerprint is not None
        if self.bridge is None:
            return []
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when
            # the caller is cancelled just as it arrives, losing the client's cancel.
            async with asyncio.timeout(request.transfer_timeout_s):
                return await self.bridge.fetch(request.stored_fingerprint, request.stored_hashes)
        except TimeoutError:
            self.fallbacks["kv_timeout"] += 1
        except Exception as e:
            log.warning("request %s: stored prefix import failed: %s", request.request_id, e)
            self.fallbacks["kv_error"] += 1
        return []

    async def _pull(self, request: DecodeRequest) -> list[int]:
        """The handoff's blocks, all of them pinned, or none (then decode recomputes the
        prompt under its own fingerprint: a block chain never mixes two engines' KV)."""
        handoff = request.handoff
        assert handoff is not None
        if not handoff.block_hashes or self.bridge is None:
            if handoff.block_hashes:
                self.fallbacks["no_kvstore"] += 1
            return []
        reason = None
        pinned: list[int] = []
        try:
            async with asyncio.timeout(request.transfer_timeout_s):  # see _import_stored
                pinned = await self.bridge.fetch(handoff.fingerprint, handoff.block_hashes)
        except TimeoutError:
            reason = "kv_timeout"
        except Exception as e:  # corrupted, unreachable: recompute rather than fail
            log.warning("request %s: KV fetch failed: %s", request.request_id, e)
            reason = "kv_error"
        finally:
            if handoff.lease_id:  # pulled or given up on: either way no longer needed
                self.bridge.release(handoff.fingerprint, handoff.lease_id)
        if reason is None and len(pinned) < len(handoff.block_hashes):
            reason = "kv_miss"  # evicted or lost shard: only part of the prompt arrived
        if reason is not None:
            self.fallbacks[reason] += 1
            port = self.engine.engine.port
            await self.engine.acall(lambda _: port.release(pinned))
            return []
        return pinned


def _keepalive(request: DecodeRequest) -> RequestOutput:
    """An output with no token: the router's sign that this replica is working on it."""
    return RequestOutput(request.request_id, [], "", False, 0, 0, 0)
