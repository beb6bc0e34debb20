"""The prefill-to-decode handoff: what prefill returns, and how a request is split.

Prefill runs the prompt with `prefill_params` (one token, no stop strings: decode checks
those over the whole text) and returns a `Handoff`. Decode pulls the named blocks, then
continues the request with the first token as an output prefix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.hashing import KVFingerprint
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Handoff:
    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    first_logprobs: TokenLogprobs | None
    fingerprint: KVFingerprint  # names `block_hashes`: the engine that computed the KV
    block_hashes: list[bytes]  # every full block of the prompt, in order
    num_cached_tokens: int  # prefix prefill found already computed
    lease_id: str = ""  # kvstore lease pinning the blocks until decode has them


def prefill_params(params: SamplingParams) -> SamplingParams:
    """The prefill half of a request: sample exactly the first token, as decode would."""
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=())
