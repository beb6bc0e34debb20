"""Prefill and decode as two engines in one process, handing KV over by memory copy.

The reference the disaggregated services are checked against (same FP8 prefill and INT4
decode, no Ray, no gRPC), and the same-device handoff of the GPU engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.handoff import Handoff, prefill_params
from engine.kv_port import copy_blocks
from engine.llm_engine import LLMEngine
from engine.outputs import Completion, RequestOutput
from engine.sampling_params import SamplingParams


class InProcessDisaggregation:
    def __init__(self, prefill: LLMEngine, decode: LLMEngine) -> None:
        if prefill.block_format != decode.block_format:
            raise ValueError(
                f"prefill and decode engines cache KV blocks differently: "
                f"{prefill.block_format} and {decode.block_format}"
            )
        self.prefill_engine = prefill
        self.decode_engine = decode

    def prefill(
        self, prompts: Sequence[Sequence[int]], params: list[SamplingParams]
    ) -> list[Handoff]:
        engine = self.prefill_engine
        ids = [
            engine.add_request(p, prefill_params(sp), hold_prompt_blocks=True)
            for p, sp in zip(prompts, params, strict=True)
        ]
        firsts: dict[str, RequestOutput] = {}
        while len(firsts) < len(ids):
            for out in engine.step():
                firsts[out.request_id] = out
        handoffs = []
        for rid, prompt in zip(ids, prompts, strict=True):
            out = firsts[rid]
            held = engine.port.held(rid)
            handoffs.append(
                Handoff(
                    request_id=rid,
                    prompt_token_ids=list(prompt),
                    first_token=out.new_token_ids[0],
                    first_logprobs=out.logprobs[0] if out.logprobs else None,
                    fingerprint=engine.fingerprint,
                    block_hashes=[h for h, _ in held],
                    num_cached_tokens=out.num_cached_tokens,
                )
            )
        return handoffs

    def transfer(self, handoff: Handoff) -> list[int]:
        """Copy the handoff's blocks decode lacks into its cache; returns them, pinned."""
        src, dst = self.prefill_engine.port, self.decode_engine.port
        have = dst.cached_prefix(handoff.block_hashes)
        missing = handoff.block_hashes[have:]
        held = dict(src.held(handoff.request_id))
        ids = dst.reserve(len(missing))
        if ids is None:
            return []  # decode is full: it will recompute the prompt itself
        copy_blocks(src.kv_cache, [held[h] for h in missing], dst.kv_cache, ids)
        try:
            dst.publish(ids, missing)
        except ValueError:  # fp8 blocks under other scales: nothing is kept
            dst.release(ids)
            raise
        return ids

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        handoffs = self.prefill(prompts, plist)
        return self.decode_engine.collect(self.hand_over(handoffs, plist))

    def hand_over(self, handoffs: list[Handoff], params: list[SamplingParams]) -> list[str]:
        """Transfer each handoff's blocks and queue its request on decode; returns the ids."""
        ids = []
        for h, p in zip(handoffs, params, strict=True):
            pinned = self.transfer(h)
            self.prefill_engine.port.release_held(h.request_id)
            ids.append(
                self.decode_engine.add_request(
                    h.prompt_token_ids,
                    p,
                    kv_fingerprint=h.fingerprint,
                    output_prefix=[h.first_token],
                    prefix_logprobs=[h.first_logprobs],
                    pinned_blocks=pinned,
                )
            )
        return ids
