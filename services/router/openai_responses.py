"""The OpenAI response shapes Baton answers with: completions, chat, streamed chunks, models,
errors. Requests are in `openai_protocol`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from services.router.choice_stream import TopLogprob, Usage


def _token_ids() -> Any:
    """A field of `return_token_ids` answers only (vLLM's), left out of the JSON otherwise."""
    return Field(None, exclude_if=lambda ids: ids is None)


def token_name(logprob: TopLogprob, as_token_id: bool) -> str:
    """A logprob's token as a response names it: its text, or (vLLM's
    `return_tokens_as_token_ids`) `token_id:<id>`, unambiguous where text is not."""
    return f"token_id:{logprob.token_id}" if as_token_id else logprob.token


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    """Per token: its text, logprob, offset in the choice's text, and the top alternatives
    (the sampled token among them, so up to `logprobs` + 1 entries). A token holding part of
    a character is named by its bytes, as OpenAI names it: `bytes:\\xf0\\x9f`."""

    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(None, description="Extension: stop string or id.")
    prompt_token_ids: list[int] | None = _token_ids()
    token_ids: list[int] | None = _token_ids()


class CompletionResponse(BaseModel):
    """A whole completion, or one streamed chunk of it (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str  # part of a character: `bytes:` and its bytes escaped, as OpenAI writes it
    logprob: float
    # The token's own UTF-8 bytes: a choice's, joined, are its text's. An alternative named
    # `token_id:<id>` has that name's bytes, as vLLM gives it.
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _token_ids()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = _token_ids()


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a delta carries only what changed: {"role": ...} first, then {"content": ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _token_ids()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = _token_ids()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "baton"
    max_model_len: int = Field(description="Extension: the context window in tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
