"""Decode steps replayed from CUDA graphs.

A decode step of a large model is hundreds of short kernels, and launching them one by
one from Python costs more than running them (bench/RESULTS.md, "Engine on the GPU":
batch-1 INT4 decode of a Llama-3-8B-shaped model, 51 tok/s eager against 344 replayed).
So a step whose every sequence decodes one token runs `LlamaModel.forward` from a graph
captured once per padded batch size (1, 2, 4, 8, ... up to `max_batch`), over static
input and metadata tensors that each step overwrites in place.

What makes one graph valid for every later step of its size:

- the Triton attention plan is built at capture for a context of `max_model_len`: the
  decode kernel derives each split's range from the device-side `seq_lens`, so a fixed
  split count is right for any length (empty splits merge as -inf), only sized for the
  longest;
- rows past the real batch are padding: they read and write only `pad_block`, a cache
  block the block pool never hands out (the runner allocates one more block than the
  pool has), so they can never touch a request's KV;
- every buffer the forward allocates comes from the graph's private pool, reused by each
  replay.

The LM head and sampling stay outside the graph (they run on the real rows only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kernels.attention_metadata import AttentionMetadata

ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def graph_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes that get a graph: powers of two below `max_batch`, and it."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch}) if max_batch > 0 else []


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    hidden: torch.Tensor


class DecodeGraphs:
    def __init__(
        self,
        forward: ForwardFn,
        device: str,
        block_size: int,
        max_model_len: int,
        max_batch: int,
        pad_block: int,
    ) -> None:
        self.forward = forward
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = graph_sizes(max_batch)
        self.pad_block = pad_block
        self.width = -(-max_model_len // block_size)
        self._captured: dict[int, _Captured] = {}
        self._pool: Any = None  # one memory pool shared by every size's graph

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self._captured)

    def covers(self, batch: int) -> bool:
        return bool(self.sizes) and batch <= self.sizes[-1]

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states [batch, hidden] of one decode token per sequence."""
        batch = len(input_ids)
        size = next(s for s in self.sizes if s >= batch)
        captured = self._captured.get(size) or self._capture(size)
        pad = size - batch
        pad_slot = self.pad_block * self.block_size
        table = torch.zeros((size, self.width), dtype=torch.int32)
        table[batch:, 0] = self.pad_block
        for i, row in enumerate(tables):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        meta = captured.meta
        captured.input_ids.copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        captured.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        meta.slot_mapping.copy_(torch.tensor(slots + [pad_slot] * pad), non_blocking=True)
        meta.seq_lens.copy_(
            torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), non_blocking=True
        )
        meta.block_tables.copy_(table, non_blocking=True)
        captured.graph.replay()
        return captured.hidden[:batch]

    @torch.inference_mode()
    def _capture(self, size: int) -> _Captured:
        dev = self.device
        pad_slot = self.pad_block * self.block_size
        tables = torch.zeros((size, self.width), dtype=torch.int32, device=dev)
        tables[:, 0] = self.pad_block
        meta = AttentionMetadata(
            slot_mapping=torch.full((size,), pad_slot, dtype=torch.int64, device=dev),
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(size, dtype=torch.int32, device=dev),
            block_tables=tables,
            num_decodes=size,
            block_size=self.block_size,
            query_lens_host=[1] * size,
            seq_lens_host=[self.max_model_len] * size,  # the plan: splits for the longest
        )
        ids = torch.zeros(size, dtype=torch.int64, device=dev)
        pos = torch.zeros(size, dtype=torch.int64, device=dev)
        # Warm up on a side stream (Triton compiles, buffers settle), as capture requires.
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(ids, pos, meta)
        torch.cuda.current_stream(dev).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self.forward(ids, pos, meta)
        self._captured[size] = _Captured(graph, ids, pos, meta, hidden)
        return self._captured[size]
