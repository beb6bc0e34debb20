"""A request as the engine tracks it: its tokens, progress, blocks' hashes and status."""

from __future__ import annotations

import enum
import time

import torch

from engine.block_pool import KVBlock
from engine.hashing import iter_block_hashes
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """One sequence being generated.

    `token_ids` is the prompt followed by every sampled token; `num_computed_tokens` of
    them already have K/V in the paged cache. A preempted request keeps its tokens and
    recomputes their K/V when it is scheduled again (from the prefix cache where it can).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        root_hash: bytes,
        block_size: int,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first scheduling; -1 until then
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.block_size = block_size
        self.block_hashes: list[bytes] = []
        self._root_hash = root_hash
        self._update_block_hashes()
        self.pinned: list[KVBlock] = []  # imported prefix blocks held until admission
        self.num_handed_over_tokens = 0  # prompt tokens of pinned blocks computed for it elsewhere
        self.hold_prompt_blocks = False
        # Full blocks that may be published to the prefix cache. A request continuing from
        # imported KV stops at its prompt: blocks after it mix this engine's arithmetic
        # into a chain named by another engine's fingerprint.
        self.publish_limit: int | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:
            self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        done = len(self.block_hashes)
        parent = self.block_hashes[-1] if done else self._root_hash
        start = done * self.block_size
        self.block_hashes.extend(iter_block_hashes(parent, self.token_ids[start:], self.block_size))

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
