"""POST /v1/responses answers: a started `ChoiceStream` of a Responses request's chat plan
as one `response` object, or as OpenAI's server-sent events.

The response echoes the request's parameters as vLLM does (temperature, top_p and
max_output_tokens as sampling resolved them); its output is one `message` item holding one
`output_text` part. Out of tokens it is `incomplete`, with `incomplete_details.reason`
`max_output_tokens`, its message too; otherwise `completed`.

A stream is `event: <type>` and `data: <json>` per event, each with a `sequence_number`
from 0, and no `[DONE]` (neither OpenAI nor vLLM sends one):

    response.created, response.in_progress     the response so far: in_progress, no output
    response.output_item.added                 the message, in_progress, no content
    response.content_part.added                its output_text part, empty
    response.output_text.delta ...             the text as it is generated
    response.output_text.done                  the whole text
    response.content_part.done, response.output_item.done
    response.completed | response.incomplete   the whole response, with usage

A generation that fails once the stream has begun ends it with `response.failed`: the
response, `failed`, with `error` {code, message} and the text generated until then.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel

from services.router.choice_stream import ChoiceStream, Usage
from services.router.errors import ApiError, as_api_error
from services.router.request_plan import RequestPlan
from services.router.responses_request import ResponsesRequest

log = logging.getLogger(__name__)

Status = Literal["in_progress", "completed", "incomplete", "failed"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        return cls(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
            output_tokens=usage.completion_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=usage.total_tokens,
        )


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """OpenAI's `response`, with the fields vLLM's ResponsesResponse echoes."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    metadata: dict[str, str] | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    temperature: float
    tool_choice: Any
    tools: list[Any]
    top_p: float
    background: bool
    max_output_tokens: int
    max_tool_calls: int | None
    previous_response_id: str | None
    prompt: Any
    reasoning: Any
    service_tier: str
    text: Any
    top_logprobs: int | None
    truncation: str
    usage: ResponseUsage | None
    user: str | None


class _Event(BaseModel):
    type: str
    sequence_number: int


class ResponseEvent(_Event):
    """response.created, .in_progress, .completed, .incomplete, .failed"""

    response: ResponseObject


class OutputItemEvent(_Event):
    """response.output_item.added, .done"""

    output_index: int = 0
    item: OutputMessage


class ContentPartEvent(_Event):
    """response.content_part.added, .done"""

    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: OutputText


class _TextEvent(_Event):
    """An event about the one output_text part of the one message item."""

    item_id: str
    output_index: int = 0
    content_index: int = 0
    logprobs: list[Any] = []


class TextDeltaEvent(_TextEvent):
    type: str = "response.output_text.delta"
    delta: str


class TextDoneEvent(_TextEvent):
    type: str = "response.output_text.done"
    text: str


class _Answer:
    """One response's fixed parts: its request and plan, creation time and message id."""

    def __init__(self, request: ResponsesRequest, plan: RequestPlan) -> None:
        assert plan.num_choices == 1, "a response has one output message"
        self.request = request
        self.plan = plan
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def message(self, text: str, status: Literal["completed", "incomplete"]) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status, content=[OutputText(text=text)])

    def finished(self, text: str, finish_reason: str | None, usage: Usage) -> ResponseObject:
        status: Literal["completed", "incomplete"] = (
            "incomplete" if finish_reason == "length" else "completed"
        )
        return self.response(
            status,
            [self.message(text, status)],
            ResponseUsage.of(usage),
            IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        )

    def failed(self, text: str, usage: Usage, error: ApiError) -> ResponseObject:
        output = [self.message(text, "incomplete")]
        response = self.response("failed", output, ResponseUsage.of(usage))
        response.error = ResponseError(code=error.code or "server_error", message=error.message)
        return response

    def response(
        self,
        status: Status,
        output: list[OutputMessage],
        usage: ResponseUsage | None = None,
        incomplete_details: IncompleteDetails | None = None,
    ) -> ResponseObject:
        request, params = self.request, self.plan.params[0]
        return ResponseObject(
            id=self.plan.request_id,
            created_at=self.created_at,
            status=status,
            incomplete_details=incomplete_details,
            instructions=request.instructions,
            metadata=request.metadata,
            model=self.plan.model,
            output=output,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            temperature=params.temperature,
            tool_choice=request.tool_choice or "auto",
            tools=[],
            top_p=params.top_p,
            background=False,
            max_output_tokens=params.max_tokens,
            max_tool_calls=request.max_tool_calls,
            previous_response_id=None,
            prompt=None,
            reasoning=None,
            service_tier=request.service_tier or "auto",
            text=request.text,
            top_logprobs=None,  # vLLM's: the sampler's logprobs, none without `include`
            truncation=request.truncation or "disabled",
            usage=usage,
            user=request.user,
        )


async def response_object(stream: ChoiceStream, request: ResponsesRequest) -> ResponseObject:
    answer = _Answer(request, stream.plan)
    (result,) = await stream.collect()
    return answer.finished(result.text, result.finish_reason, stream.usage)


async def response_events(stream: ChoiceStream, request: ResponsesRequest) -> AsyncIterator[str]:
    """The events of a started stream, as server-sent event text."""
    answer = _Answer(request, stream.plan)
    item_id = answer.message_id
    numbers = itertools.count()

    def event(kind: type[_Event], **fields: Any) -> str:
        return _sse(kind(sequence_number=next(numbers), **fields))

    running = answer.response("in_progress", [])
    yield event(ResponseEvent, type="response.created", response=running)
    yield event(ResponseEvent, type="response.in_progress", response=running)
    added = OutputMessage(id=item_id, status="in_progress", content=[])
    yield event(OutputItemEvent, type="response.output_item.added", item=added)
    empty = OutputText(text="")
    yield event(ContentPartEvent, type="response.content_part.added", item_id=item_id, part=empty)
    text = ""
    finish_reason = None
    try:
        async for out in stream:
            finish_reason = out.finish_reason
            if out.text:
                text += out.text
                yield event(TextDeltaEvent, item_id=item_id, delta=out.text)
    except Exception as e:  # the status line is sent: the failure becomes the last event
        failed = answer.failed(text, stream.usage, _api_error(e))
        yield event(ResponseEvent, type="response.failed", response=failed)
        return
    done = answer.finished(text, finish_reason, stream.usage)
    (message,) = done.output
    yield event(TextDoneEvent, item_id=item_id, text=text)
    part = message.content[0]
    yield event(ContentPartEvent, type="response.content_part.done", item_id=item_id, part=part)
    yield event(OutputItemEvent, type="response.output_item.done", item=message)
    yield event(ResponseEvent, type=f"response.{done.status}", response=done)


def _sse(event: _Event) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


def _api_error(error: Exception) -> ApiError:
    if not isinstance(error, ApiError):
        log.exception("stream failed")
    return as_api_error(error)
