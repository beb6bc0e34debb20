"""An `LLMEngine` stepped on its own thread, streamed to asyncio callers.

Servers (HTTP, gRPC, Ray Serve replicas) call `generate` from their event loop; the engine
thread runs `step()` whenever there is work and hands each request's outputs to the loop
that asked for them. The loop never waits for a step: new requests, aborts and `acall`s go
into an inbox that the engine thread applies between steps (as vLLM's AsyncLLM posts to its
engine core), and their answers come back to the asking loop like outputs do. torch
releases the GIL inside its kernels, so the event loop keeps serving while a step computes.

    event loop(s)                        engine thread
    generate / abort / acall ──inbox──▶  apply commands ─▶ step() ─▶ outputs
          ▲                                                               │
          └──────────── call_soon_threadsafe (answers, outputs) ◀────────┘

A caller that stops iterating (client disconnect, cancellation) aborts its request, which
frees its blocks at the next step boundary; so does a caller whose event loop has closed.

A caller that watches for silence (the router takes a decode replica that sends nothing
for `stall_timeout_s` for dead) asks for `keepalive_s`: while a request waits its turn
(queued behind `max_num_seqs` running ones, or between steps), it gets an output with no
tokens every `keepalive_s` in which the engine completed a step. Progress, not time: an
engine thread that hangs sends none, and the caller's silence check still fires.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread failed; nothing more can be served by this engine."""


class RequestRefused(ValueError):
    """`generate` refused the request before queueing it (bad input, an id in use): nothing
    of it exists in the engine, so the caller must not clean up under its id."""


_KEEPALIVE = RequestOutput("", [], "", False, 0, 0, 0)
"""Queued by a stream's keepalive timer; `generate` yields an empty output for its request."""

_ABORTED = RequestOutput("", [], "", True, 0, 0, 0, finish_reason="abort")
"""Queued by `abort`; `generate` yields an empty finished output for its request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    request_id: str | None = None  # set by the engine thread when the engine admits it
    delivered: bool = False  # an output arrived since the keepalive timer last looked


class _Timer:
    """The handle of a re-arming timer, which replaces it each time it fires."""

    handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class AsyncEngine:
    """Threading: `engine` and `_streams` are touched only by the engine thread (between
    steps, by the commands of `_inbox`) or, once it has ended, under `_closing`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: deque[Callable[[], object]] = deque()
        self._closing = threading.RLock()  # `_closed` and the appends to `_inbox`
        self._closed = False  # the engine thread takes no more commands
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # requests admitted and not yet finished
        self._stopping = False
        self._dead: BaseException | None = None
        self._steps = 0  # steps completed: a keepalive's evidence that the engine runs
        self._thread = threading.Thread(target=self._loop, name="baton-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        keepalive_s: float | None = None,
        **add_kwargs: Any,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs. Bad input raises RequestRefused (a ValueError) before
        any output; a dead engine raises EngineDeadError.

        With `keepalive_s`, an output without tokens (`new_token_ids` empty, not finished,
        counts as last reported) comes every `keepalive_s` in which the engine stepped but
        this request got nothing (see the module's docstring). A request ended by `abort`
        ends with an output without tokens, finished for "abort"."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        admitted: asyncio.Future[str] = loop.create_future()

        def admit() -> str:
            # Checked here too: the engine may have died since the check above.
            self.check_alive()
            try:
                rid = self.engine.add_request(prompt, params, request_id, **add_kwargs)
            except ValueError as e:
                raise RequestRefused(str(e)) from e
            stream.request_id = rid
            self._streams[rid] = stream
            return rid

        def add() -> None:
            if not self._answer(loop, admitted, admit):
                self._release(stream)

        self._submit(add)
        timer: _Timer | None = None
        finished = False
        last: RequestOutput | None = None
        try:
            rid = await admitted
            if keepalive_s is not None:
                timer = self._keepalive(stream, keepalive_s)
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _KEEPALIVE or item is _ABORTED:
                    finished = item.finished
                    yield _without_tokens(rid, last, item.finish_reason)
                    continue
                stream.delivered = True
                finished, last = item.finished, item
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            if not finished:  # also when cancelled before the engine admitted it
                self._submit(lambda: self._release(stream))

    def _keepalive(self, stream: _Stream, every_s: float) -> _Timer:
        """A timer on the stream's loop that queues _KEEPALIVE every `every_s` in which the
        engine completed a step and the stream got no output (one timer a stream: no
        per-output cost)."""
        seen = self._steps
        timer = _Timer()

        def look() -> None:
            nonlocal seen
            if stream.delivered:
                stream.delivered = False
            elif self._steps != seen:
                stream.queue.put_nowait(_KEEPALIVE)
            seen = self._steps
            timer.handle = stream.loop.call_later(every_s, look)

        timer.handle = stream.loop.call_later(every_s, look)
        return timer

    async def acall(self, fn: Callable[[LLMEngine], T]) -> T:
        """`fn(engine)`, run on the engine thread between steps (for state a step must not
        see half-changed, or that must not be read half-changed), without blocking the loop.
        Once called, `fn` runs even if the caller is cancelled meanwhile (cleanup may rely
        on it), and its result is then dropped: a `fn` that takes something the caller must
        give back (pins, reserved blocks) belongs in `call`, which no cancel interrupts."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._submit(lambda: self._answer(loop, done, lambda: fn(self.engine)))
        return await done

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Blocking `acall`: the calling thread waits until the engine thread has run `fn`,
        up to a whole step. For threads other than an event loop's (tests, metric readers);
        on a loop, which it freezes meanwhile, only where no cancel may come between `fn`
        and the use of its result. Never from the engine thread, which would wait forever."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(self.engine))
            except Exception as e:  # the caller's error, not the engine's
                done.set_exception(e)

        self._submit(run)
        return done.result()

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its `generate` stream ends with an output
        finished for "abort". False if the engine has no such unfinished request."""
        return await self.acall(lambda _: self._abort(request_id))

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def check_alive(self) -> None:
        """Raises EngineDeadError once the engine thread has failed or is shutting down."""
        if self._dead is not None:
            raise EngineDeadError(f"engine thread failed: {self._dead!r}") from self._dead
        if self._stopping:
            raise EngineDeadError("engine is shutting down")

    # -- the engine thread's side --------------------------------------------------------

    def _submit(self, command: Callable[[], object]) -> None:
        """Queue `command` for the engine thread; once that has ended, run it right here
        (under `_closing`, so one at a time)."""
        with self._closing:
            if self._closed:
                command()
                return
            self._inbox.append(command)
        self._wake.set()

    def _run_commands(self) -> None:
        while self._inbox:
            self._inbox.popleft()()

    def _loop(self) -> None:
        error: BaseException = EngineDeadError("engine shut down")
        try:
            while not self._stopping:
                self._run_commands()
                if not self.engine.has_unfinished:
                    # Cleared before the inbox is read again: a command queued meanwhile
                    # sets it anew, so none waits behind an idle engine.
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._steps += 1
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # an engine bug: fail every request, serve no more
            log.exception("engine thread failed")
            self._dead = error = e
        self._close(error)

    def _close(self, error: BaseException) -> None:
        with self._closing:
            self._closed = True
            while self._inbox:  # new requests among them are refused: check_alive fails
                try:
                    self._inbox.popleft()()
                except Exception:
                    log.exception("a command failed as the engine thread ended")
            streams, self._streams = self._streams, {}
            for rid, stream in streams.items():
                try:
                    self.engine.abort(rid)
                except Exception:  # a broken engine: its waiters must hear of it all the same
                    log.exception("request %s: abort failed as the engine thread ended", rid)
                self._post(stream.loop, stream.queue.put_nowait, error)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # its caller has gone, or it was not added through `generate`
        if out.finished:  # forgotten before its caller hears: the id is free at once
            del self._streams[out.request_id]
        if not self._post(stream.loop, stream.queue.put_nowait, out) and not out.finished:
            log.warning("request %s: its caller's loop is closed; aborting it", out.request_id)
            self._release(stream)

    def _release(self, stream: _Stream) -> None:
        """Forget a stream whose caller has gone and abort its request, if the request is
        still this stream's: a finished request's id may already name a new one."""
        rid = stream.request_id
        if rid is not None and self._streams.get(rid) is stream:
            del self._streams[rid]
            self.engine.abort(rid)

    def _abort(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._post(stream.loop, stream.queue.put_nowait, _ABORTED)
        return self.engine.abort(request_id)

    def _answer(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], fn: Callable[[], T]
    ) -> bool:
        """Run `fn` and hand its result or error to `future`, which waits on `loop`; False
        if that loop has closed (the answer is lost)."""
        try:
            result = fn()
        except Exception as e:  # the caller's error, not the engine's
            return self._post(loop, _settle, future, None, e)
        return self._post(loop, _settle, future, result, None)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> bool:
        """Run `callback(*args)` on `loop`; False if the loop has closed."""
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # "Event loop is closed": nobody is listening there any more
            return False
        return True


def _settle(future: asyncio.Future[T], result: T, error: BaseException | None) -> None:
    if future.done():
        return  # its awaiter was cancelled
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _without_tokens(
    rid: str, last: RequestOutput | None, finish_reason: str | None
) -> RequestOutput:
    """A keepalive (`finish_reason` None) or an aborted request's end, with the counts last
    reported (zero before the first output)."""
    prompt, cached, output = (
        (0, 0, 0)
        if last is None
        else (last.num_prompt_tokens, last.num_cached_tokens, last.num_output_tokens)
    )
    return RequestOutput(
        rid, [], "", finish_reason is not None, prompt, cached, output, finish_reason
    )
