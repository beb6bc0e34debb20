"""The OpenAI request shapes Baton serves (completions, chat), validated where JSON enters.

Requests accept and ignore unknown fields, as OpenAI-compatible servers do, so every field
(OpenAI's or vLLM's) that would change the output is declared here: those Baton cannot
honour (penalties, logit bias, min_p, beam search, prompt logprobs, echo, tools,
structured output, ...) are accepted only at their neutral values (`_NEUTRAL`,
what clients send by default) and refused otherwise, so a client never gets an answer that
silently ignored what it asked for. What is left unknown changes nothing in the answer
(`metadata`, `store`, `service_tier`, ...). Ranges are checked here, where the user's JSON
enters, so that an error names the field (`param`); the engine's `SamplingParams` still
asserts its own invariants behind this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
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
MAX_REQUEST_ID = 256  # characters; a client's id is echoed in every response and in traces
MAX_REQUEST_BYTES = 4 * 2**20  # default cap on a request body (HTTP) or message (gRPC)

NonEmptyStr = Annotated[str, Field(min_length=1)]
StopList = Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


# Fields Baton does not implement, each with the values that ask for nothing: vLLM's and
# OpenAI's defaults, which some clients send explicitly. Any other value is refused.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "logit_bias": (None, {}),
    "min_p": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "length_penalty": (None, 1.0),
    "use_beam_search": (None, False),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncation_side": (None, "left"),  # "right" would keep the prompt's first tokens
    "prompt_logprobs": (None,),
    "logits_processors": (None, []),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structural_tag": (None,),
    "structured_outputs": (None,),
    "vllm_xargs": (None, {}),
    "priority": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "prompt_embeds": (None,),
    "add_special_tokens": (None, True),  # completions; chat's default is false
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None, []),
    "reasoning_effort": (None,),
    "include_reasoning": (None, True),
    "verbosity": (None,),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "web_search_options": (None,),
    "continuous_usage_stats": (None, False),
}


def checked_request_id(value: str) -> str:
    """A client's own request id, or ValueError saying why not: it is echoed in every
    response and written into logs and traces, so it is bounded and has no control
    characters (a newline would forge a log line)."""
    if len(value) > MAX_REQUEST_ID:
        raise ValueError(f"{len(value)} characters; at most {MAX_REQUEST_ID}")
    if not value.isprintable():
        raise ValueError("must be printable text, without control characters")
    return value


class OpenAIModel(BaseModel):
    """A request shape where `null` means a field's default, as OpenAI's nullable fields
    and vLLM's `Optional[...] = default` read it: clients (and wrappers that forward
    `n=kwargs.get("n")`) send `"n": null`, `"stream": null`."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None
            or key not in fields
            or fields[key].is_required()
            or fields[key].default is None
        }


def _neutral_only(neutral: dict[str, tuple[Any, ...]], value: Any, info: ValidationInfo) -> Any:
    assert info.field_name is not None
    values = neutral[info.field_name]
    if value not in values:
        raise ValueError(f"not supported by Baton; leave it out or send {json.dumps(values[-1])}")
    return value


class StreamOptions(OpenAIModel):
    include_usage: bool = Field(False, description="End the stream with a usage-only chunk.")
    continuous_usage_stats: bool | None = Field(None, description="Extension; unsupported.")

    @field_validator("continuous_usage_stats")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(_NEUTRAL, value, info)


class SamplingRequest(OpenAIModel):
    """What completions and chat requests share. Floats must be finite: a NaN would pass
    no bound check with a message that makes sense."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    neutral_values: ClassVar[dict[str, tuple[Any, ...]]] = _NEUTRAL

    model: str | None = Field(None, description="The served model's id; omitted: that model.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus mass; default 1.")
    top_k: int | None = Field(
        None, ge=-1, le=MAX_TOP_K, description="Extension: 0 or -1 disables top-k."
    )
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63, description="Choice i of n samples with seed+i (mod 2^63)."
    )
    stop: NonEmptyStr | StopList | None = Field(None, description="Strings that end a choice.")
    stop_token_ids: list[TokenId] | None = Field(None, description="Extension: ids that end it.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per choice; default 16 (completions), the rest of the context "
        "window (chat).",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Tokens per choice, over max_tokens (OpenAI's newer name)."
    )
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
    include_stop_str_in_output: bool = Field(
        False,
        description="Extension: a choice that a stop string or stop token ends keeps it at the "
        "end of its text.",
    )
    best_of: int | None = Field(None, description="Only equal to n (no server-side ranking).")
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        description="Extension: keep only the prompt's last k tokens (after the chat template "
        "for chat); -1 keeps as many as the context window leaves beside max_tokens.",
    )
    return_token_ids: bool = Field(
        False,
        description="Extension (vLLM's): the answer carries each prompt's token ids and "
        "each choice's (a stream: the prompt's with a choice's first chunk, then each "
        "chunk's new ones).",
    )
    return_tokens_as_token_ids: bool | None = Field(
        None,
        description="Extension: logprobs name each token `token_id:<id>` instead of its text.",
    )
    request_id: str | None = Field(
        None,
        description="Extension: the response's id is `cmpl-`/`chatcmpl-` and this one (an "
        "X-Request-Id header overrides it). Need not be unique: the engine runs the request "
        "under an id of its own.",
    )

    # Unsupported: accepted only at their neutral values (_NEUTRAL).
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    use_beam_search: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncation_side: str | None = None
    prompt_logprobs: int | None = None
    logits_processors: list[Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structural_tag: Any = None
    structured_outputs: Any = None
    vllm_xargs: dict[str, Any] | None = None
    priority: int | None = None
    echo: bool | None = None
    add_special_tokens: bool | None = None

    @field_validator(*_NEUTRAL, check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(cls.neutral_values, value, info)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 would leave no prompt; keep at least 1 token, or send -1")
        return value

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, value: str | None) -> str | None:
        return None if value is None else checked_request_id(value)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of must equal n: choices are not ranked server-side")
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

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def output_param(self) -> str:
        """The field that set the output's length, for errors that name it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: NonEmptyStr | Annotated[list[str], Field(min_length=1)] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives.")
    top_logprobs: int | None = Field(None, description="Chat's; completions take logprobs.")
    suffix: str | None = None  # unsupported (insertion): only empty
    prompt_embeds: Any = None  # unsupported

    @field_validator("top_logprobs")
    @classmethod
    def _chat_only(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError(
                "a chat field; completions take logprobs, the number of alternatives per "
                "token (0-20)"
            )
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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] | None = None  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call the assistant made, as an earlier turn of the conversation records it."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template_value(self) -> dict[str, Any]:
        # Tool-use templates expect the arguments as a mapping (transformers' convention);
        # vLLM parses the JSON text, and reads what is not a JSON object as no arguments.
        arguments = self.function.arguments
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        return {
            "id": self.id,
            "function": {
                "arguments": arguments if isinstance(arguments, dict) else {},
                "name": self.function.name,
            },
            "type": self.type,
        }


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextContentPart], Field(min_length=1)] | None = Field(
        None, validate_default=True, description="Only the assistant's may be left out."
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="The assistant's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    reasoning: str | None = Field(
        None,
        validation_alias=AliasChoices("reasoning", "reasoning_content"),
        description="The assistant's reasoning, for templates that interleave it.",
    )

    @field_validator("content")
    @classmethod
    def _needs_content(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role not in (None, "assistant"):
            raise ValueError(f"required in a {role} message (only the assistant's may be absent)")
        return value

    @property
    def text(self) -> str:
        """The content as one string; text parts are joined by newlines, as vLLM does; no
        content is empty text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as vLLM hands it to the chat template, which decides what to render:
        role and content text, the assistant's tool calls (an empty list dropped) and
        reasoning (under both names templates use), a tool message's `tool_call_id`, and
        any role's `name`. Other keys are not passed, as in vLLM."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.role == "assistant":
            if self.tool_calls:
                message["tool_calls"] = [call.template_value() for call in self.tool_calls]
            if self.reasoning is not None:
                message["reasoning"] = message["reasoning_content"] = self.reasoning
        elif self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    neutral_values: ClassVar[dict[str, tuple[Any, ...]]] = _NEUTRAL | {
        "add_special_tokens": (None, False)  # the template writes BOS; true adds another
    }

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(
        True,
        description="Extension: open a new assistant turn after the messages. False: the last "
        "message must be the assistant's.",
    )
    continue_final_message: bool = Field(
        False,
        description="Extension: the model continues the last message (the assistant's), "
        "rather than answering it; needs add_generation_prompt false.",
    )

    # Unsupported: accepted only at their neutral values (_NEUTRAL).
    tools: list[Any] | None = None
    tool_choice: Any = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("add_generation_prompt")
    @classmethod
    def _assistant_last(cls, value: bool, info: ValidationInfo) -> bool:
        # The answer is the assistant's: without a new turn, the last message must be one.
        messages = info.data.get("messages")
        if not value and messages and messages[-1].role != "assistant":
            raise ValueError(
                "false needs the last message to be the assistant's (the model continues "
                f"after it); the last message is the {messages[-1].role}'s"
            )
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _no_new_turn(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError(
                "cannot be true together with add_generation_prompt (true by default); send "
                "add_generation_prompt false to continue the last message"
            )
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value


def invalid_request(errors: Sequence[ErrorDetails]) -> InvalidRequestError:
    """The client's error for pydantic's validation errors, naming its field.

    A value that fails a union fails every member; the member it matched best is the one
    whose error is about a limit rather than a type, and deepest. A value of none of the
    members' types is refused naming each (`stop: 5`: a valid string or a valid list).
    Locations hold member tags
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
    members = [
        e["msg"].removeprefix("Input should be ")
        for e in errors
        if e["type"].endswith("_type")
        and len(e["loc"]) == len(error["loc"])
        and e["loc"][:-1] == error["loc"][:-1]
    ]
    if error["type"].endswith("_type") and len(members) > 1:
        message = "Input should be " + " or ".join(dict.fromkeys(members))
    return InvalidRequestError(f"{param}: {message}" if param else message, param or None)


# FastAPI prefixes body fields with "body"; union members of builtin types carry their name
_NOT_FIELDS = frozenset({"body", "str", "int", "float", "bool", "list", "dict", "none"})
