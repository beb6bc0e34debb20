"""Per-request sampling parameters, validated where users set them."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_TOP_K = 2**31 - 1
"""Any k at or above the vocabulary keeps every token; past int32 it only overflows."""
SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`)."""


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style sampling controls.

    temperature 0 (anything below `SAMPLING_EPS`) means greedy; top_k 0 disables top-k;
    top_p 1 disables nucleus sampling.
    A `seed` makes a request's samples reproducible whatever else shares its batch.
    Until `min_tokens` tokens are out, EOS and `stop_token_ids` cannot be sampled and stop
    strings do not end the request.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _ints(self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}"
            )
        # NaN fails every comparison, so the range checks refuse it too.
        if not _is_real(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(
                f"top_k must be an integer in [0, {MAX_TOP_K}] (0 disables), got {self.top_k!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )

    def check_fits(
        self, prompt_tokens: int, max_model_len: int, output_field: str = "max_tokens"
    ) -> None:
        """Refuses a request whose prompt and `max_tokens` overrun the context window;
        `output_field` is the request's name for `max_tokens`."""
        needed = prompt_tokens + self.max_tokens
        if needed > max_model_len:
            raise ValueError(
                f"this model's context window is {max_model_len} tokens, but the request "
                f"needs {needed} ({prompt_tokens} in the prompt, {self.max_tokens} for "
                f"{output_field}); shorten the prompt or lower {output_field}"
            )

    @property
    def greedy(self) -> bool:
        # As vLLM: logits divided by a tinier temperature overflow float32 (inf, then NaN).
        return self.temperature < SAMPLING_EPS


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a token count or seed is a caller's mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strings(stop: object) -> tuple[object, ...]:
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list | tuple):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    return tuple(stop)


def _ints(token_ids: object) -> tuple[object, ...]:
    if not isinstance(token_ids, list | tuple):
        raise ValueError(
            f"stop_token_ids must be a list of integers, got {type(token_ids).__name__}"
        )
    return tuple(token_ids)
