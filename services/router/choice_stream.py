"""ChoiceStream: the choices of one request, generated concurrently and merged into one
stream of per-choice increments, with the request's usage.

Each choice is its own pipeline request, pumped by its own task into a shared queue, so
increments arrive in the order the engine produced them and carry their choice index.

    start()      submits every choice and waits for each one's first output: input the
                 model cannot take (ValueError) or a full queue fails here, before a
                 front end has sent a status line or a single chunk
    async for    ChoiceOutput per increment, until every choice has finished
    collect()    or instead: start, then every choice whole (ChoiceResult)
    aclose()     cancels what still runs; each pipeline generator aborts its engine request

The engine cuts a stop string off a choice's text; with `include_stop_str_in_output` the
last increment gets it back here (the engine's text ends exactly where the stop string
began, and nothing after it was ever released).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.outputs import RequestOutput
from engine.sampler import TokenLogprobs
from engine.tokenizer import IncrementalDetokenizer
from services.router.errors import ApiError, InvalidRequestError, remote_cause
from services.router.pipeline import Pipeline
from services.router.request_plan import RequestPlan

MIN_LOGPROB = -9999.0  # -inf is not JSON; OpenAI-compatible servers clamp here (vLLM does)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str  # its text, special tokens spelled out; part of a character: `bytes:\xf0\x9f`
    token_bytes: bytes  # exact: a choice's tokens' bytes joined are its text's UTF-8
    logprob: float


@dataclass(frozen=True)
class SampledLogprob(TopLogprob):
    top: tuple[TopLogprob, ...]  # the most likely alternatives, best first
    # Characters of the choice's text before this token, as the engine detokenizes it:
    # monotonic; past the text's end only for a token a stop string cut off.
    text_offset: int


@dataclass(frozen=True)
class ChoiceOutput:
    """One increment of one choice: new text and tokens, and how it ended if it did."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampledLogprob] | None  # None unless the request asked for logprobs
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class ChoiceResult:
    """A whole choice, as `ChoiceStream.collect` assembles it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0  # each prompt once, however many choices it has
    completion_tokens: int = 0  # every choice's generated tokens, stop and EOS included
    cached_tokens: int = 0  # prompt tokens read from the prefix cache (first choice's count)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_Item = RequestOutput | BaseException


class ChoiceStream:
    def __init__(self, pipeline: Pipeline, plan: RequestPlan) -> None:
        self.plan = plan
        self._tokenizer = pipeline.tokenizer
        self._pipeline = pipeline
        self._queue: asyncio.Queue[tuple[int, _Item]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: deque[tuple[int, RequestOutput]] = deque()  # taken by start()
        self._output_tokens = [0] * plan.num_choices
        self._cached_tokens = [0] * plan.num_choices
        self._unfinished = set(range(plan.num_choices))
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}  # for logprobs' offsets

    async def start(self) -> None:
        """Submits every choice and waits until each is admitted (has its first output);
        raises ApiError, having closed the stream, if one is not."""
        assert not self._tasks, "start() runs once"
        self._tasks = [
            asyncio.create_task(self._pump(i, self._pipeline.generate(request)))
            for i, request in enumerate(self.plan.generation_requests())
        ]
        waiting = set(range(self.plan.num_choices))
        try:
            while waiting:
                index, item = await self._next_item()
                self._ready.append((index, item))
                waiting.discard(index)
        except BaseException:
            await self.aclose()
            raise

    async def collect(self) -> list[ChoiceResult]:
        """Starts the stream and runs every choice to its end; the results in choice order."""
        await self.start()
        results = [ChoiceResult(i) for i in range(self.plan.num_choices)]
        async for out in self:
            result = results[out.index]
            result.text += out.text
            result.token_ids += out.token_ids
            if out.logprobs is not None:
                result.logprobs = result.logprobs or []
                result.logprobs.extend(out.logprobs)
            result.finish_reason = out.finish_reason
            result.stop_reason = out.stop_reason
        return results

    def __aiter__(self) -> AsyncIterator[ChoiceOutput]:
        return self._outputs()

    @property
    def done(self) -> bool:
        """Every choice has finished (the output just yielded was the stream's last)."""
        return not self._unfinished

    @property
    def usage(self) -> Usage:
        """Counts so far; final once the stream is exhausted."""
        plan = self.plan
        firsts = range(0, plan.num_choices, plan.n)
        return Usage(
            prompt_tokens=sum(len(p) for p in plan.prompts),
            completion_tokens=sum(self._output_tokens),
            cached_tokens=sum(self._cached_tokens[i] for i in firsts),
        )

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _outputs(self) -> AsyncIterator[ChoiceOutput]:
        assert self._tasks, "start() first"
        try:
            while self._unfinished:
                index, out = self._ready.popleft() if self._ready else await self._next_item()
                yield self._record(index, out)
        finally:
            await self.aclose()

    async def _next_item(self) -> tuple[int, RequestOutput]:
        index, item = await self._queue.get()
        if isinstance(item, ApiError):
            raise item
        if isinstance(item, ValueError):  # the pipeline's word for input it cannot take
            raise InvalidRequestError(str(remote_cause(item))) from item
        if isinstance(item, BaseException):
            raise item
        return index, item

    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        # Cancelling this task raises CancelledError inside the generator's own await, so
        # the generator's cleanup (aborting its engine request) runs before the task ends.
        try:
            finished = False
            async for out in outputs:
                finished = out.finished
                self._queue.put_nowait((index, out))
            if not finished:  # or the merged stream would wait for this choice forever
                raise RuntimeError(f"choice {index}'s pipeline stream ended unfinished")
        except Exception as e:
            self._queue.put_nowait((index, e))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # aclose(): the stream is ending
                raise
            # The pipeline's own cancellation (a Ray call cancelled under it): a failure of
            # this choice, or the merged stream would wait for it forever.
            failure = RuntimeError(f"choice {index}'s pipeline call was cancelled")
            self._queue.put_nowait((index, failure))

    def _record(self, index: int, out: RequestOutput) -> ChoiceOutput:
        self._output_tokens[index] = out.num_output_tokens
        self._cached_tokens[index] = out.num_cached_tokens
        if out.finished:
            self._unfinished.discard(index)
        text = out.new_text
        if out.finish_reason == "stop" and self.plan.include_stop_str_in_output:
            text += self._stop_text(out.stop_reason)
        logprobs = None
        if self.plan.params[index].logprobs is not None:
            if index not in self._detokenizers:
                self._detokenizers[index] = IncrementalDetokenizer(self._tokenizer)
            detokenizer = self._detokenizers[index]
            logprobs = [
                self._sampled(t, lp, detokenizer)
                for t, lp in zip(out.new_token_ids, out.logprobs, strict=True)
            ]
        return ChoiceOutput(
            index=index,
            text=text,
            token_ids=out.new_token_ids,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
        )

    def _stop_text(self, stop_reason: int | str | None) -> str:
        """What ended a choice, as text: its stop string, or its stop token's text (vLLM
        decodes it as any output token; EOS, a special token, has none)."""
        if isinstance(stop_reason, int):
            return self._tokenizer.decode([stop_reason])
        return stop_reason or ""

    def _sampled(
        self, token_id: int, logprobs: TokenLogprobs, detokenizer: IncrementalDetokenizer
    ) -> SampledLogprob:
        offset = len(detokenizer.text)  # the text before this token's
        detokenizer.push(token_id)
        sampled = self._top(token_id, logprobs.token_logprob)
        return SampledLogprob(
            **vars(sampled),
            top=tuple(self._top(t, lp) for t, lp in logprobs.top),
            text_offset=offset,
        )

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self._tokenizer.token_bytes(token_id)
        return TopLogprob(token_id, _shown(raw), raw, max(logprob, MIN_LOGPROB))


def _shown(raw: bytes) -> str:
    """A token as OpenAI shows it: its text, or, for bytes that are not text on their own
    (part of a multi-byte character), `bytes:` and the bytes escaped as in `bytes:\\xf0\\x9f`
    (printable ASCII kept)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(
            chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw
        )
