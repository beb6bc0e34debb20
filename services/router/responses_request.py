"""The request of POST /v1/responses (OpenAI's Responses API, text only) and the chat
request it is.

A Responses request is a chat request in other words, and is planned as one
(`plan_response` calls `plan_chat`): `instructions` becomes a system message first,
`input` the messages after it (a string is one user message), `max_output_tokens` the
chat's `max_completion_tokens`, `truncation: "auto"` its `truncate_prompt_tokens: -1`.
So it is templated, bounded and sampled exactly as chat is, and the fields the two share
(temperature, top_p and vLLM's extensions) are checked there, once, under the same names.
As in vLLM, a last input message of the assistant's whose status is `in_progress` or
`incomplete` is continued rather than answered.

Baton keeps no responses. As vLLM does with its store off (VLLM_ENABLE_RESPONSES_API_STORE
unset, its default), `store: true` (OpenAI's default) is accepted and nothing is stored;
what needs a stored response is refused: `previous_response_id`, `background`. So is
what Baton does not serve: tools, reasoning options, structured output, logprobs
(`include`, `top_logprobs`), prompt templates, items other than messages and content
other than text. Each refusal is a 400 naming its field.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.router.errors import InvalidRequestError
from services.router.openai_protocol import ChatCompletionRequest, invalid_request
from services.router.pipeline import Pipeline
from services.router.request_plan import RequestPlan, plan_chat

# Fields Baton does not serve, each with the values that ask for nothing (OpenAI's and
# vLLM's defaults, which clients may send explicitly) and why any other is refused.
_WHOLE_CONVERSATION = "send the whole conversation as input instead"
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((None,), f"Baton keeps no responses; {_WHOLE_CONVERSATION}"),
    "previous_response": ((None,), f"not supported; {_WHOLE_CONVERSATION}"),
    "previous_input_messages": ((None, []), f"not supported; {_WHOLE_CONVERSATION}"),
    "background": ((None, False), "background responses need a store, and Baton keeps none"),
    "tools": ((None, []), "tools are not supported"),
    "tool_choice": ((None, "none", "auto"), "tools are not supported"),
    "reasoning": ((None, {}), "reasoning options are not supported"),
    "include": ((None, []), "additional output (logprobs, tool results) is not supported"),
    "top_logprobs": ((None, 0), "logprobs are not supported"),
    "text": ((None, {"format": {"type": "text"}}), "only plain text output is supported"),
    "prompt": ((None,), "prompt templates are not supported"),
    "enable_response_messages": ((None, False), "raw messages are not returned"),
    "mm_processor_kwargs": ((None, {}), "only text input is supported"),
}

# vLLM's extensions and OpenAI's fields that the chat request takes under the same name.
_FORWARDED = {
    "model",
    "temperature",
    "top_p",
    "user",
    "top_k",
    "seed",
    "stop",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "cache_salt",
    "request_id",
    "logit_bias",
    "repetition_penalty",
    "priority",
    "vllm_xargs",
    "structured_outputs",
}
# The chat request's names for Responses fields, as its errors name them.
_CHAT_NAMES = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "truncate_prompt_tokens": "truncation",
}


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in ("input_text", "output_text"):
            raise ValueError(
                f"{data.get('type')!r} content is not supported; Baton serves text only "
                "(input_text and output_text parts)"
            )
        return data


class InputMessage(BaseModel):
    """A message item of `input`: OpenAI's easy form ({role, content}) or its item form
    (with `type: "message"`, and `id` and `status` when it is an earlier output)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputText], Field(min_length=1)]
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, data: Any) -> Any:
        kind = data.get("type", "message") if isinstance(data, dict) else "message"
        if kind != "message":
            raise ValueError(
                f"{kind!r} items are not supported; Baton takes message items only (no tool "
                "calls, tool outputs, reasoning or item references)"
            )
        return data

    def chat_message(self) -> dict[str, Any]:
        """As a chat message: text parts stay parts, which chat joins (with newlines)."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        parts = [{"type": "text", "text": part.text} for part in self.content]
        return {"role": self.role, "content": parts}


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="ignore")

    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = Field(None, description="A system message before the input.")
    model: str | None = Field(None, description="The served model's id; omitted: that model.")
    max_output_tokens: int | None = Field(
        None, ge=1, description="Output tokens at most; default: the rest of the context window."
    )
    temperature: float | None = Field(None, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, description="Nucleus mass; default 1.")
    stream: bool | None = False
    truncation: Literal["auto", "disabled"] | None = Field(
        "disabled", description="auto: keep the conversation's last tokens that fit."
    )

    # Accepted, echoed, and without effect: nothing is stored, no tool is ever called.
    store: bool | None = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = True
    max_tool_calls: int | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = "auto"
    prompt_cache_key: str | None = None

    # vLLM's extensions, checked by the chat request.
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool | None = None
    cache_salt: str | None = None
    request_id: str | None = Field(
        None, description="Extension: the response's id, as it is (default resp_<random>)."
    )
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = None
    priority: int | None = None
    vllm_xargs: dict[str, Any] | None = None
    structured_outputs: Any = None

    # Unsupported: accepted only at their neutral values (_UNSUPPORTED).
    previous_response_id: str | None = None
    previous_response: Any = None
    previous_input_messages: list[Any] | None = None
    background: bool | None = False
    tools: list[Any] | None = None
    tool_choice: Any = "auto"
    reasoning: Any = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    text: Any = None
    prompt: Any = None
    enable_response_messages: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        neutral, why = _UNSUPPORTED[info.field_name]
        if value in neutral:
            return value
        if neutral == (None,):
            raise ValueError(why)
        raise ValueError(f"{why}; leave it out or send {json.dumps(neutral[-1])}")

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request this one is; InvalidRequestError (naming this request's
        field) where it has a value chat refuses."""
        continued = self._continues_last_message()
        fields = self.model_dump(include=_FORWARDED, exclude_none=True)
        fields |= {
            "messages": self._messages(),
            "max_completion_tokens": self.max_output_tokens,
            "truncate_prompt_tokens": -1 if self.truncation == "auto" else None,
            "add_generation_prompt": not continued,
            "continue_final_message": continued,
        }
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as e:
            raise _in_responses_terms(invalid_request(e.errors())) from e

    def _messages(self) -> list[dict[str, Any]]:
        messages = []
        if self.instructions:  # vLLM skips empty instructions too
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [item.chat_message() for item in self.input]
        return messages

    def _continues_last_message(self) -> bool:
        if isinstance(self.input, str):
            return False
        last = self.input[-1]
        return last.role == "assistant" and last.status in ("in_progress", "incomplete")


def plan_response(request: ResponsesRequest, pipeline: Pipeline, tenant: str = "") -> RequestPlan:
    """The chat plan of a Responses request, answering as `resp_<random>` or, as vLLM
    does, as the client's own `request_id`."""
    chat = request.chat_request()
    response_id = chat.request_id or f"resp_{uuid.uuid4().hex}"
    try:
        return plan_chat(chat, pipeline, request_id=response_id, tenant=tenant)
    except InvalidRequestError as e:
        raise _in_responses_terms(e) from e


def _in_responses_terms(error: InvalidRequestError) -> InvalidRequestError:
    """The error as a Responses client reads it: chat's names for its fields replaced."""
    field = (error.param or "").split(".")[0].split("[")[0]
    ours = _CHAT_NAMES.get(field)
    if ours is None:
        return error
    message = error.message
    for chat_name, name in _CHAT_NAMES.items():
        message = re.sub(rf"\b{chat_name}\b(\[\d+\])?", name, message)
    return InvalidRequestError(message, param=ours)
