"""An `LLMEngine` stepped on its own thread, streamed to asyncio callers.

Servers (HTTP, gRPC, Ray Serve replicas) call `generate` from their event loop; the engine
thread runs `step()` whenever there is work and hands each request's outputs to the loop
that asked for them. torch releases the GIL inside its kernels, so the event loop keeps
serving while a step computes.

A caller that stops iterating (client disconnect, cancellation) aborts its request, which
frees its blocks at once.

A caller that watches for silence (the router takes a decode replica that sends nothing
for `stall_timeout_s` for dead) asks for `keepalive_s`: while a request waits its turn
(queued behind `max_num_seqs` running ones, or between steps), it gets an output with no
tokens every `keepalive_s` in which the engine completed a step. Progress, not time: an
engine thread that hangs sends none, and the caller's silence check still fires.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
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
"""Queued by a stream's keepalive timer; `generate` yields a copy for its request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    delivered: bool = False  # an output arrived since the keepalive timer last looked


class _Timer:
    """The handle of a re-arming timer, which replaces it each time it fires."""

    handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # every engine call happens under it
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
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
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Bad input raises ValueError before anything is queued.

        With `keepalive_s`, an output without tokens (`new_token_ids` empty, not finished,
        `num_output_tokens` as last reported) comes every `keepalive_s` in which the engine
        stepped but this request got nothing (see the module's docstring)."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        with self._lock:
            try:
                rid = self.engine.add_request(prompt, params, request_id, **add_kwargs)
            except ValueError as e:
                raise RequestRefused(str(e)) from e
            self._streams[rid] = stream
        self._wake.set()
        timer = None if keepalive_s is None else self._keepalive(stream, keepalive_s)
        finished = False
        reported = 0
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _KEEPALIVE:
                    yield RequestOutput(rid, [], "", False, 0, 0, reported)
                    continue
                stream.delivered = True
                finished, reported = item.finished, item.num_output_tokens
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                # A finished id can be taken again at once: only our own stream is ours.
                if self._streams.get(rid) is stream:
                    del self._streams[rid]
                if not finished:
                    self.engine.abort(rid)

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

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` between steps (for state the loop must not see half-changed)."""
        with self._lock:
            return fn(self.engine)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            return self.engine.abort(request_id)

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

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
                    targets = [(self._streams.get(o.request_id), o) for o in outputs]
                self._steps += 1
            except BaseException as e:  # an engine bug: fail every request, serve no more
                log.exception("engine step failed")
                self._dead = e
                self._fail_all(e)
                return
            for stream, out in targets:
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        self._fail_all(EngineDeadError("engine shut down"))

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.items())
            for rid, _ in streams:
                self.engine.abort(rid)
        for _, stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
