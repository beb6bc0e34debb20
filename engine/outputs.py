"""What the engine reports per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """The increment since the last report: new tokens and the text they completed.

    `finish_reason` is "stop" (EOS, stop token or stop string), "length" (max_tokens or
    the context window) or "abort"; `stop_reason` names the stop string or token id.
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

    def merge(self, later: RequestOutput) -> None:
        """Appends the next increment of the same request, as if one report carried both."""
        assert later.request_id == self.request_id and not self.finished
        self.new_token_ids += later.new_token_ids
        self.new_text += later.new_text
        self.logprobs += later.logprobs
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens
        self.num_output_tokens = later.num_output_tokens
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason


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
