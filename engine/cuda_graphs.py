"""Decode steps replayed from CUDA graphs: forward, LM head and sampler in one replay.

A decode step of a large model is hundreds of short kernels, and launching them one by
one from Python costs more than running them (bench/RESULTS.md, "Engine on the GPU":
batch-1 INT4 decode of a Llama-3-8B-shaped model, 51 tok/s eager against 344 replayed).
So a step whose every sequence decodes one token runs `LlamaModel.forward`, the LM head
and `engine.sampler.sample_tokens` from a graph captured once per padded batch size (1, 2,
4, 8, ... up to `max_batch`) and sampler plan (greedy, or the sampling steps the batch
uses), over static input tensors that each step overwrites in place.

One step, host and device:

    host: fill pinned staging ──H2D (2 copies; +5 when sampling)──> static inputs
          replay ──> (fed tokens) embed .. layers .. norm .. LM head .. sampler -> tokens
          tokens ──D2H into pinned memory──> event, waited on one step later

The engine reads a step's tokens while the next step runs (engine.llm_engine): that step
takes its input tokens from the device (`feed`), so the host never waits for the GPU
between two decode steps, and its scheduling of step n+1 overlaps step n's replay.

What makes one graph valid for every later step of its size:

- the Triton attention plan is built at capture for a context of `max_model_len`: the
  decode kernel derives each split's range from the device-side `seq_lens`, so a fixed
  split count is right for any length (empty splits merge as -inf), only sized for the
  longest;
- rows past the real batch are padding: they read and write only `pad_block`, a cache
  block the block pool never hands out (the runner allocates one more block than the
  pool has), so they can never touch a request's KV, and they sample greedily;
- every buffer the graphs allocate comes from one private pool, reused by each replay:
  a replay's outputs are valid only until the next replay of any graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.sampler import GREEDY, SamplerPlan, SamplingTensors, sample_tokens
from engine.sampling_params import SamplingParams
from kernels.attention_metadata import AttentionMetadata

ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def graph_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes that get a graph: powers of two below `max_batch`, and it."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch}) if max_batch > 0 else []


@dataclass
class _Inputs:
    """One padded size's static device inputs, shared by the graphs of every plan.

    `ints` is [input_ids | positions | slot_mapping | feed] and `meta_ints` [seq_lens |
    block_tables], so each step fills them with one copy apiece. `feed[i]` >= 0 makes row
    i's input token the one the previous replay sampled in that row (still on its way to
    the host), instead of `input_ids[i]`."""

    size: int
    ints: torch.Tensor
    meta_ints: torch.Tensor
    meta: AttentionMetadata
    sampling: SamplingTensors | None = None  # made at the first sampling plan's capture

    @property
    def input_ids(self) -> torch.Tensor:
        return self.ints[: self.size]

    @property
    def positions(self) -> torch.Tensor:
        return self.ints[self.size : 2 * self.size]

    @property
    def feed(self) -> torch.Tensor:
        return self.ints[3 * self.size :]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [size, vocab] in the model's dtype
    tokens: torch.Tensor  # [size] int64


@dataclass(frozen=True)
class DecodeStep:
    """A replayed step's outputs, valid until the next replay."""

    logits: torch.Tensor  # [batch, vocab]
    tokens: torch.Tensor  # [batch] int64 on the device


class PendingTokens:
    """A replay's token ids on their way into pinned host memory."""

    def __init__(self, host: torch.Tensor, copied: torch.cuda.Event) -> None:
        self._host = host
        self._copied = copied

    def wait(self) -> list[int]:
        """The token ids, once copied: the host's one sync on a decode step."""
        self._copied.synchronize()
        return self._host.tolist()


class DecodeGraphs:
    def __init__(
        self,
        forward: ForwardFn,
        logits: LogitsFn,
        device: str,
        block_size: int,
        max_model_len: int,
        max_batch: int,
        pad_block: int,
        vocab_size: int,
    ) -> None:
        self.forward = forward
        self.logits = logits
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = graph_sizes(max_batch)
        self.pad_block = pad_block
        self.vocab_size = vocab_size
        self.width = -(-max_model_len // block_size)
        self._inputs: dict[int, _Inputs] = {}
        self._captured: dict[tuple[int, SamplerPlan], _Captured] = {}
        self._pool: Any = None  # one memory pool shared by every graph
        # Pinned staging, shared by every size (filled for the size replayed). A fill
        # waits for `_staged`, the previous step's copies out of it.
        largest = self.sizes[-1] if self.sizes else 0
        self._ints = torch.zeros(4 * largest, dtype=torch.int64, pin_memory=True)
        self._meta_ints = torch.zeros(
            largest * (1 + self.width), dtype=torch.int32, pin_memory=True
        )
        self._sampling: SamplingTensors | None = None  # pinned, made at the first sampled step
        self._staged = torch.cuda.Event()
        # Every replay leaves its tokens in `_last_tokens`, where the next one's `feed`
        # finds them. Their host copies alternate between two pinned buffers: a step's
        # tokens are read while the next step runs, never later.
        self._last_tokens = torch.zeros(largest, dtype=torch.int64, device=self.device)
        self._host_tokens = [
            torch.zeros(largest, dtype=torch.int64, pin_memory=True) for _ in range(2)
        ]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0

    @property
    def captured_sizes(self) -> list[int]:
        return sorted({size for size, _ in self._captured})

    @property
    def captured_plans(self) -> list[tuple[int, SamplerPlan]]:
        return sorted(self._captured, key=lambda k: (k[0], repr(k[1])))

    def graph(self, size: int, plan: SamplerPlan) -> torch.cuda.CUDAGraph:
        """A captured graph, to replay alone (benchmarks: the GPU's share of a step)."""
        return self._captured[(size, plan)].graph

    def covers(self, batch: int) -> bool:
        return bool(self.sizes) and batch <= self.sizes[-1]

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        plan: SamplerPlan = GREEDY,
        feed: list[int] | None = None,
    ) -> DecodeStep:
        """Replay one decode token per sequence; tokens sampled on the device by `plan`
        (GREEDY: argmax, and the caller may sample the returned logits itself). `feed[i]`
        >= 0: row i's input is the token the previous replay sampled in row feed[i] (its
        `input_ids[i]` is a placeholder)."""
        batch = len(input_ids)
        size = next(s for s in self.sizes if s >= batch)
        inputs = self._inputs.get(size) or self._make_inputs(size)
        captured = self._captured.get((size, plan)) or self._capture(size, plan)
        self._staged.synchronize()  # the staging buffers are free to refill
        self._stage(size, input_ids, positions, slots, seq_lens, tables, feed or [-1] * batch)
        inputs.ints.copy_(self._ints[: 4 * size], non_blocking=True)
        inputs.meta_ints.copy_(self._meta_ints[: inputs.meta_ints.numel()], non_blocking=True)
        if plan.sample:
            if self._sampling is None:
                self._sampling = SamplingTensors.empty(self.sizes[-1], self.vocab_size, pin=True)
            host_noise = self._sampling.fill(params, generators, plan)
            assert inputs.sampling is not None
            inputs.sampling.copy_(self._sampling, size, noise=host_noise)
        self._staged.record()
        captured.graph.replay()
        return DecodeStep(captured.logits[:batch], captured.tokens[:batch])

    def send_tokens(self, step: DecodeStep) -> PendingTokens:
        """Start copying the step's token ids to pinned host memory; read them (`wait`)
        before the step after next is replayed."""
        batch = step.tokens.shape[0]
        host, copied = self._host_tokens[self._turn][:batch], self._copied[self._turn]
        self._turn ^= 1
        host.copy_(step.tokens, non_blocking=True)
        copied.record()
        return PendingTokens(host, copied)

    def _stage(
        self,
        size: int,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        feed: list[int],
    ) -> None:
        batch, pad = len(input_ids), size - len(input_ids)
        ints = self._ints.numpy()
        ints[: 4 * size] = [
            *input_ids, *[0] * pad,
            *positions, *[0] * pad,
            *slots, *[self.pad_block * self.block_size] * pad,
            *feed, *[-1] * pad,
        ]  # fmt: skip
        meta_ints = self._meta_ints.numpy()
        meta_ints[:size] = [*seq_lens, *[1] * pad]
        table = meta_ints[size : size * (1 + self.width)].reshape(size, self.width)
        table[:] = 0
        table[batch:, 0] = self.pad_block
        for i, row in enumerate(tables):
            table[i, : len(row)] = row

    def _make_inputs(self, size: int) -> _Inputs:
        dev = self.device
        ints = torch.zeros(4 * size, dtype=torch.int64, device=dev)
        meta_ints = torch.zeros(size * (1 + self.width), dtype=torch.int32, device=dev)
        tables = meta_ints[size:].view(size, self.width)
        meta = AttentionMetadata(
            slot_mapping=ints[2 * size : 3 * size],
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=dev),
            seq_lens=meta_ints[:size],
            block_tables=tables,
            num_decodes=size,
            block_size=self.block_size,
            query_lens_host=[1] * size,
            seq_lens_host=[self.max_model_len] * size,  # the plan: splits for the longest
        )
        self._inputs[size] = _Inputs(size, ints, meta_ints, meta)
        return self._inputs[size]

    @torch.inference_mode()
    def _capture(self, size: int, plan: SamplerPlan) -> _Captured:
        dev = self.device
        inputs = self._inputs[size]
        # Every row padding while the warm-up and capture run: they write K/V, and must
        # write it nowhere but the padding block.
        inputs.ints[: 2 * size] = 0
        inputs.ints[2 * size : 3 * size] = self.pad_block * self.block_size
        inputs.feed.fill_(-1)
        inputs.meta_ints.zero_()
        inputs.meta.seq_lens.fill_(1)
        inputs.meta.block_tables[:, 0] = self.pad_block
        if plan.sample and inputs.sampling is None:
            inputs.sampling = SamplingTensors.empty(size, self.vocab_size, dev)
            inputs.sampling.temperature.zero_()  # padding rows, until a step fills them

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            # `feed` indexes the previous replay's rows, of whatever size it was.
            fed = self._last_tokens[inputs.feed.clamp(min=0)]
            ids = torch.where(inputs.feed >= 0, fed, inputs.input_ids)
            hidden = self.forward(ids, inputs.positions, inputs.meta)
            logits = self.logits(hidden)
            tokens = sample_tokens(logits, plan, inputs.sampling)
            self._last_tokens[:size].copy_(tokens)
            return logits, tokens

        # The warm-up writes `_last_tokens`, which may hold a running step's tokens that
        # the step being captured for is about to take as its inputs: keep them.
        running = self._last_tokens.clone()
        # Warm up on a side stream (Triton compiles, buffers settle), as capture requires.
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self._last_tokens.copy_(running)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, tokens = step()
        self._captured[(size, plan)] = _Captured(graph, logits, tokens)
        return self._captured[(size, plan)]
