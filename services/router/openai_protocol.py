"""The OpenAI request shapes Baton serves (completions, chat), validated where JSON enters.

Requests accept and ignore unknown fields, as OpenAI-compatible servers do; fields that
would change the output in a way Baton cannot honour (penalties, logit bias, echo, tools,
structured output) are accepted only at their neutral values, so a client never gets an
answer that silently ignored what it asked for. Ranges are checked here, where the user's
JSON enters, so that an error names the field (`param`); the engine's `SamplingParams`
still asserts its own invariants behind this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, MAX_TOP_K
from services.router.errors import InvalidRequestError

MAX_N = 128  # OpenAI's limit on choices per request
MAX_REQUEST_BYTES = 4 * 2**20  # default cap on a request body (HTTP) or message (gRPC)

NonEmptyStr = Annotated[str, Field(min_length=1)]
StopList = Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="End the stream with a usage-only chunk.")


class SamplingRequest(BaseModel):
    """What completions and chat requests share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The served model's id; omitted: that model.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus mass; default 1.")
    top_k: int | None = Field(
        None, ge=-1, le=MAX_TOP_K, description="Extension: 0 or -1 disables top-k."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Choice i of n samples with seed+i.")
    stop: NonEmptyStr | StopList | None = Field(None, description="Strings that end a choice.")
    stop_token_ids: list[TokenId] | None = Field(None, description="Extension: ids that end it.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate for each prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(0, ge=0, description="Extension: no stop before this many tokens.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past EOS.")
    user: str | None = None
    cache_salt: str | None = Field(
        None,
        max_length=256,
        description="Extension: prefix-cache namespace; requests with different salts never "
        "share cached KV (and so cannot observe each other's prompts through cached_tokens).",
    )
    presence_penalty: float | None = Field(None, description="Unsupported: only 0.")
    frequency_penalty: float | None = Field(None, description="Unsupported: only 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Unsupported: only empty.")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported; send 0 or leave it out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it out")
        return value

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: NonEmptyStr | Annotated[list[str], Field(min_length=1)] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(None, ge=1, description="Tokens per choice; default 16.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives.")
    echo: bool = Field(False, description="Unsupported: only false.")
    suffix: str | None = Field(None, description="Unsupported: only null.")
    best_of: int | None = Field(None, description="Only equal to n (no server-side ranking).")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported; leave it out")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported; leave it out")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of must equal n: choices are not ranked server-side")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        items: list[Any] = list(self.prompt)
        return [items] if all(isinstance(p, int) for p in items) else items


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"only text content parts are supported, not {data.get('type')!r}")
        return data


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextContentPart], Field(min_length=1)]

    @property
    def text(self) -> str:
        """The content as one string; text parts are joined by newlines, as vLLM does."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI for the next.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Tokens per choice; default: the rest of the context window."
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = Field(None, description="Unsupported: only empty.")
    tool_choice: Any = Field(None, description='Unsupported: only "none".')
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calling is not supported; leave tools out")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise ValueError('tool calling is not supported; tool_choice may only be "none"')
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError('structured output is not supported; only {"type": "text"}')
        return value

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def invalid_request(errors: Sequence[ErrorDetails]) -> InvalidRequestError:
    """The client's error for pydantic's validation errors, naming its field.

    A value that fails a union fails every member; the member it matched best is the one
    whose error is about a limit rather than a type, and deepest. Locations hold member tags
    (`'list[int]'`, `'TextContentPart'`) besides field names and list indexes; tags are
    dropped, so `prompt[1]` or `messages[0].content` remains.
    """
    error = max(reversed(errors), key=lambda e: (not e["type"].endswith("_type"), len(e["loc"])))
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in _NOT_FIELDS:
            param += f".{part}" if param else part
    ctx = error.get("ctx") or {}
    if error["type"] == "json_invalid":
        return InvalidRequestError(f"malformed JSON body: {ctx.get('error', error['msg'])}")
    message = str(ctx["error"]) if error["type"] == "value_error" else error["msg"]
    return InvalidRequestError(f"{param}: {message}" if param else message, param or None)


# FastAPI prefixes body fields with "body"; union members of builtin types carry their name
_NOT_FIELDS = frozenset({"body", "str", "int", "float", "bool", "list", "dict", "none"})
