"""Continuous batching: each step spends a token budget on decodes, then prefill chunks.

Every step, running requests are served first (in arrival order): a decode costs one
token, a request mid-prefill takes the next chunk the budget allows. What is left admits
waiting requests, whose cached prefix costs nothing. When the pool runs out of blocks the
newest running request is preempted: its blocks are freed and it waits at the front of
the queue to recompute (from the prefix cache where its blocks survive).

A queued request may pin imported KV blocks (a disaggregated handoff) until admission.
Pins are the weakest claim on the pool: the transport took them before the request
reached the queue, out of turn. When the pool is short, queued requests' pins are
released, newest first, before a running request is preempted, and before the head of the
queue is refused with nothing running (else pins behind it could hold every free block
forever). Released blocks keep their hashes in the free queue: their request finds them
again as a prefix hit if they survive, and recomputes what was evicted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import KVBlock
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.sequence import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's work. Decodes (one new token each) come before prefill chunks."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    first_scheduled: list[Request] = field(default_factory=list)  # their prefix hit is known

    @property
    def entries(self) -> list[tuple[Request, int]]:
        return [(r, 1) for r in self.decodes] + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._allocate(request, n, release_pins=True):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, n))
                budget -= n
                i += 1
                continue
            break
        # A step that had to preempt admits nothing new: the pool is already short.
        while (
            self.waiting
            and budget > 0
            and not batch.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            prefix = self.kv.computed_prefix(request)
            num_cached = len(prefix) * self.kv.block_size
            n = min(request.num_tokens - num_cached, budget)
            if request.publish_limit is not None:
                # Past its hit, a request with imported KV computes its own (its pins were
                # released and evicted): never to be cached under the other engine's names.
                request.publish_limit = min(request.publish_limit, len(prefix))
            # With requests running, the head waits for their blocks rather than take pins.
            if not self._allocate(request, n, prefix, release_pins=not self.running):
                break
            self.waiting.popleft()
            self.kv.unpin(request)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                batch.first_scheduled.append(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, n))
            budget -= n
        for request, n in scheduled:
            if request.num_computed_tokens == request.num_tokens - 1 and n == 1:
                batch.decodes.append(request)
            else:
                batch.prefills.append((request, n))
        return batch

    def _allocate(
        self, request: Request, n: int, prefix: list[KVBlock] | None = None, *, release_pins: bool
    ) -> bool:
        """`kv.allocate`; while the pool is short and `release_pins`, first releases the pins
        of other queued requests, newest first."""
        while not self.kv.allocate(request, n, prefix):
            holders = (r for r in reversed(self.waiting) if r.pinned and r is not request)
            holder = next(holders, None) if release_pins else None
            if holder is None:
                return False
            self.kv.unpin(holder)
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def advance(self, batch: ScheduledBatch) -> list[Request]:
        """Record the step's computed tokens; returns the requests that reached their end
        and so get a sampled token (a partial prefill chunk does not)."""
        done = []
        for request, n in batch.entries:
            request.num_computed_tokens += n
            if request.num_computed_tokens == request.num_tokens:
                done.append(request)
        return done

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, out of length, or aborted) and release its blocks."""
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        self.kv.unpin(request)
        self.kv.free(request)
