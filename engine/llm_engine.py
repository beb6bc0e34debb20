"""The engine loop: admit requests, step the batch, report what each request gained.

def step(self):
    batch = self.scheduler.schedule()
    result = self.runner.execute(batch, self.kv)
    return self._finish_step(batch, result)

A decode step sampled inside a CUDA graph (engine.cuda_graphs) is read one step late: its
requests get a placeholder token and the step after it is scheduled and launched at once,
taking those tokens from the device, while the GPU still runs the first; only then does
the host wait for the first step's tokens and report them. A request that stopped in the
first step wasted its row of the second, which is dropped. Any other step needs its
inputs on the host, so the pending step is read before it runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.hashing import KVFingerprint, root_hash
from engine.kv_cache_manager import KVCacheManager
from engine.kv_format import KV_LAYOUT_VERSION
from engine.kv_port import KVPort
from engine.kv_scales import calibrate_kv_scales
from engine.loaders import LoadedCheckpoint
from engine.model import LlamaModel
from engine.model_runner import ModelRunner, StepResult
from engine.outputs import Completion, RequestOutput
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Request, RequestStatus
from engine.text_stream import TextStream


@dataclass
class EngineStats:
    """Cumulative counters; services export them as metrics."""

    steps: int = 0
    computed_tokens: int = 0  # tokens run through the model (prefill chunks + decodes)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV was not computed here: local
    # prefix-cache hits plus imported tokens
    handed_over_prompt_tokens: int = 0  # of those, KV computed for the request elsewhere
    # and handed over (disaggregated prefill): no prefix-cache hit
    generated_tokens: int = 0
    preemptions: int = 0


PLACEHOLDER = -1
"""A sampled token still on its way from the device (never a vocabulary id)."""


class LLMEngine:
    def __init__(self, checkpoint: LoadedCheckpoint, config: EngineConfig) -> None:
        if checkpoint.config != config.model:
            raise ValueError("EngineConfig.model must be the checkpoint's config")
        self.config = config
        self.tokenizer = checkpoint.tokenizer
        # An fp8 cache's scales are a function of the checkpoint alone (engine.kv_scales):
        # every engine of these weights, whatever its own format, derives the same ones.
        fp8 = config.kv_dtype == "fp8_e4m3"
        kv_scales = calibrate_kv_scales(checkpoint) if fp8 else None
        self.model = LlamaModel(config, checkpoint.tensors, kv_scales)
        self.fingerprint = KVFingerprint(
            model_id=checkpoint.model_id,
            weights_digest=checkpoint.weights_digest,
            kv_dtype=config.kv_dtype,
            kv_layout_version=KV_LAYOUT_VERSION,
            prefill_quant=self.model.format.scheme,
            block_size=config.cache.block_size,
        )
        self.block_format = config.block_format
        self.pool = BlockPool(config.cache.num_blocks, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(config, self.model)
        scales = self.model.kv_scales
        fp8_port = None if scales is None else (self.block_format, scales)
        self.port = KVPort(self.pool, self.runner.kv_blocks, fp8_port)
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._streams: dict[str, TextStream] = {}
        self._pending: list[RequestOutput] = []
        self._in_flight: StepResult | None = None  # a step whose tokens are pending
        self._ids = itertools.count()

    # -- admission -------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: bytes = b"",
        *,
        kv_fingerprint: KVFingerprint | None = None,
        output_prefix: Sequence[int] = (),
        prefix_logprobs: Sequence[TokenLogprobs | None] = (),
        pinned_blocks: Sequence[int] = (),
        handed_over: bool = False,
        hold_prompt_blocks: bool = False,
    ) -> str:
        """Validate and queue a request; raises ValueError (queueing nothing) on bad input.

        Disaggregated serving uses the keyword options. `kv_fingerprint` names the prompt's
        blocks as the engine that computed them did (prefill's, for imported KV).
        `output_prefix` holds tokens already sampled elsewhere (prefill's first token, with
        `prefix_logprobs`), reported at the next step as the request's first outputs.
        `pinned_blocks` (from `port.reserve` and `port.publish`) are held for the request
        until it is scheduled; `handed_over` says they were computed for this request
        elsewhere (a prefill's handoff), not found in a cache, so they are no prefix-cache
        hit in `stats`. `hold_prompt_blocks` keeps the prompt's full blocks cached
        and pinned after the request finishes, for `port.held` and `port.release_held`.
        """
        try:
            request = self._admit(
                prompt, params, request_id, cache_salt, kv_fingerprint, output_prefix
            )
        except ValueError:
            # The pins were handed over with the request: refused, it leaves none behind.
            self.port.release(list(pinned_blocks))
            raise
        request_id = request.request_id
        request.pinned = [self.pool.blocks[i] for i in pinned_blocks]
        if handed_over:
            request.num_handed_over_tokens = len(pinned_blocks) * self.config.cache.block_size
        request.hold_prompt_blocks = hold_prompt_blocks
        if (kv_fingerprint or self.fingerprint) != self.fingerprint:
            # Only the imported blocks belong to that chain: blocks this engine computes
            # after them are its own arithmetic, never to be cached under another's name.
            request.publish_limit = len(pinned_blocks)
        self._requests[request_id] = request
        # Output resumed elsewhere (`output_prefix`) is pushed below, after the prompt.
        prompt_ids = request.token_ids[: request.num_prompt_tokens]
        self._streams[request_id] = TextStream(self.tokenizer, params.stop, prompt_ids)
        self.scheduler.add(request)
        logprobs = list(prefix_logprobs) + [None] * (len(output_prefix) - len(prefix_logprobs))
        for token, lp in zip(output_prefix, logprobs, strict=True):
            self._skip_sample(request)
            request.append_token(token)
            out = self._report(request, token, lp)
            self._pending.append(out)
            if out.finished:
                break
        return request_id

    def _admit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        cache_salt: bytes,
        kv_fingerprint: KVFingerprint | None,
        output_prefix: Sequence[int],
    ) -> Request:
        """The request, validated (ValueError for input it cannot take), not yet queued."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests or self.port.holds(request_id):
            # Held blocks are the finished request's until its server releases them: a new
            # request under the id would replace them and strand them.
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(token_ids, params)
        self._check_tokens(list(output_prefix), "output_prefix")
        self._check_tokens(list(params.stop_token_ids), "stop_token_ids")
        if len(output_prefix) > params.max_tokens:
            raise ValueError("output_prefix is longer than max_tokens")
        fingerprint = kv_fingerprint or self.fingerprint
        if fingerprint.block_size != self.config.cache.block_size:
            raise ValueError(
                f"kv_fingerprint block size {fingerprint.block_size} differs from the "
                f"engine's {self.config.cache.block_size}"
            )
        return Request(
            request_id,
            token_ids,
            params,
            root_hash(fingerprint, cache_salt),
            self.config.cache.block_size,
        )

    def _skip_sample(self, request: Request) -> None:
        # A token sampled elsewhere used one draw of the request's generator: take it here
        # too, so a seeded request samples the same tokens as in a colocated engine.
        if request.generator is not None and not request.params.greedy:
            torch.empty(self.config.model.vocab_size).exponential_(generator=request.generator)

    def _check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        self._check_tokens(token_ids, "prompt")
        params.check_fits(len(token_ids), self.config.scheduler.max_model_len)

    def _check_tokens(self, token_ids: list[int], what: str) -> None:
        vocab = self.config.model.vocab_size
        if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab):
            return  # two passes in C; the per-token scan below only finds the culprit
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._forget(request)
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self._pending) or self._in_flight is not None

    # -- the loop --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not (batch and self.runner.defers(batch)):
            outputs += self._resolve(previous)
            previous = None
            # Requests that stopped in the step just read leave this one.
            batch.decodes = [r for r in batch.decodes if not r.status.finished]
        if batch:
            result = self.runner.execute(batch, self.kv, previous)
            outputs += self._finish_step(batch, result)
        if previous is not None:
            outputs += self._resolve(previous)
        spare = self._in_flight
        if spare is not None and all(r.status.finished for r in spare.requests):
            # Every request of the running step stopped in the one just read: nothing to
            # wait for but the step itself.
            self._resolve(spare)
            self._in_flight = None
        return outputs

    def _finish_step(self, batch: ScheduledBatch, result: StepResult) -> list[RequestOutput]:
        self.stats.steps += 1
        self.stats.computed_tokens += batch.num_tokens
        for request in batch.first_scheduled:
            self.stats.prompt_tokens += request.num_prompt_tokens
            self.stats.cached_prompt_tokens += request.num_cached_tokens
            self.stats.handed_over_prompt_tokens += min(
                request.num_handed_over_tokens, request.num_cached_tokens
            )
        self.scheduler.advance(batch)
        if result.samples is None:
            # Sampled on the device: a placeholder holds each new token's place (the next
            # step's input comes from the device) until `_resolve` reads it.
            for request in result.requests:
                request.token_ids.append(PLACEHOLDER)
            self._in_flight = result
            return []
        outputs = []
        for request, token, logprobs in zip(
            result.requests, result.samples.token_ids, result.samples.logprobs, strict=True
        ):
            request.append_token(token)
            self.stats.generated_tokens += 1
            outputs.append(self._report(request, token, logprobs))
        return outputs

    def _resolve(self, result: StepResult) -> list[RequestOutput]:
        """Read a pending step's tokens and report them. A request's placeholders are its
        last tokens: this step's, then the next's if that step is running too."""
        assert result.pending is not None
        outputs = []
        for request, token in zip(result.requests, result.pending.wait(), strict=True):
            if request.status.finished:
                continue  # stopped in the step before, or aborted: a spare row
            first = request.token_ids.index(PLACEHOLDER, request.num_prompt_tokens)
            running = len(request.token_ids) - first - 1  # the running step's placeholder
            assert running in (0, 1) and request.token_ids[-1] == PLACEHOLDER, request
            del request.token_ids[first:]
            request.append_token(token)  # a real token: hashes a block it completes
            self.stats.generated_tokens += 1
            outputs.append(self._report(request, token, None))
            if not request.status.finished:
                request.token_ids.extend([PLACEHOLDER] * running)
        return outputs

    def _report(
        self, request: Request, token: int, logprobs: TokenLogprobs | None
    ) -> RequestOutput:
        params = request.params
        stream = self._streams[request.request_id]
        status: RequestStatus | None = None
        if not params.ignore_eos and token in self.config.model.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids:
            status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token
        else:
            stream.push(token, check_stop=request.num_output_tokens >= params.min_tokens)
            if stream.stopped_by is not None:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stream.stopped_by
        if status is None and (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.config.scheduler.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if request.hold_prompt_blocks:
                full = request.num_prompt_tokens // self.config.cache.block_size
                self.port.keep(request.request_id, self.kv.hold_prefix(request, full))
            self.scheduler.finish(request, status)
            self._forget(request)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            new_text=stream.release(final=status is not None),
            finished=status is not None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            num_output_tokens=request.num_output_tokens,
            finish_reason=None if status is None else status.value,
            stop_reason=request.stop_reason,
            logprobs=[logprobs] if logprobs is not None else [],
        )

    def _forget(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        self._streams.pop(request.request_id, None)

    # -- conveniences ----------------------------------------------------------------

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams
    ) -> Iterator[RequestOutput]:
        """Run one request to completion, yielding its increments (other requests also step)."""
        request_id = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(request_id)

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run every prompt to completion as one continuous batch; results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, plist, strict=True):
                ids.append(self.add_request(prompt, p))
        except ValueError:
            for rid in ids:
                self.abort(rid)
            raise
        return self.collect(ids)

    def collect(self, ids: list[str]) -> list[Completion]:
        """Step until every listed (queued) request finishes; completions in that order."""
        prompts = {
            rid: self._requests[rid].token_ids[: self._requests[rid].num_prompt_tokens]
            for rid in ids
            if rid in self._requests
        }
        done: dict[str, Completion] = {
            rid: Completion(rid, prompts.get(rid, []), [], "", "", None, 0) for rid in ids
        }
        pending = set(ids)
        while pending:
            for out in self.step():
                c = done.get(out.request_id)
                if c is None:
                    continue
                c.token_ids += out.new_token_ids
                c.text += out.new_text
                c.logprobs += out.logprobs
                c.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason = out.finish_reason or ""
                    c.stop_reason = out.stop_reason
                    pending.discard(out.request_id)
        return [done[rid] for rid in ids]
