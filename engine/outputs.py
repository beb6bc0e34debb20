"""What the engine reports per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """The increment since the last report: new tokens and the text they completed.

    `finish_reason` is "stop" (EOS, stop token or stop string), "length" (max_tokens or
    the context window) or "abort"; `stop_reason` names the stop string or token id.
    `first_token_pool` is set by a router that split the request between pools: the pool
    that computed the prompt and first token ("prefill", or "decode" when decode prefilled
    it); None from an engine.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_token_pool: str | None = None


@dataclass
class Completion:
    """A finished request, as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
