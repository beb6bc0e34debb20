"""Turns a scheduled batch into tensors, runs the model, and samples the next tokens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, PendingTokens
from engine.kv_cache_manager import KVCacheManager
from engine.model import LlamaModel
from engine.sampler import GREEDY, Sampler, SampleResult, SamplerPlan
from engine.scheduler import ScheduledBatch
from engine.sequence import Request
from kernels.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class StepResult:
    """Sampled tokens for the requests that reached their last position this step: in
    `samples`, or, for a decode step sampled inside its CUDA graph, still on their way to
    the host (`pending`, read one step later; `rows` places each request in the step, for
    the next step to take its input token from the device)."""

    requests: list[Request]
    samples: SampleResult | None
    pending: PendingTokens | None = None
    rows: dict[str, int] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaModel) -> None:
        cfg = config.model
        self.config = config
        self.model = model
        self.block_size = config.cache.block_size
        self.graphs: DecodeGraphs | None = None
        pad_blocks = 0
        if config.uses_cuda_graphs:
            pad_blocks = 1  # engine.cuda_graphs: the padding rows' block, never pooled
            self.graphs = DecodeGraphs(
                lambda ids, pos, meta: model.forward(ids, pos, self.kv_cache, meta),
                model.logits,
                config.device,
                self.block_size,
                config.scheduler.max_model_len,
                min(config.cuda_graph_max_batch, config.scheduler.max_num_seqs),
                pad_block=config.cache.num_blocks,
                vocab_size=cfg.vocab_size,
            )
        # Block-major: one block of every layer is one contiguous transferable slice, its
        # payload (engine.kv_format): an fp8 block's ends with the scales it was written with.
        fmt = config.block_format
        self.kv_blocks = fmt.empty_blocks(config.cache.num_blocks + pad_blocks, config.device)
        """One block payload a row: what leaves and enters the engine (engine.kv_port)."""
        if model.kv_scales is not None:
            fmt.scales_view(self.kv_blocks).copy_(model.kv_scales)
        self.kv_cache = fmt.data_view(self.kv_blocks)
        """[blocks, layers, 2, block_size, kv_heads, head_dim]: what the model reads."""
        self.sampler = Sampler()

    def defers(self, batch: ScheduledBatch) -> bool:
        """Whether `execute` leaves this batch's tokens pending (sampled in a CUDA graph):
        then it may run while the previous step's tokens are still pending."""
        return self._graphed(batch) and self._on_device(batch.decodes)

    def _graphed(self, batch: ScheduledBatch) -> bool:
        decodes = len(batch.decodes)
        return self.graphs is not None and not batch.prefills and self.graphs.covers(decodes)

    def _on_device(self, requests: list[Request]) -> bool:
        # The graph's sampler suppresses no ids and computes no logprobs.
        return all(not self._suppressed(r) and r.params.logprobs is None for r in requests)

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, kv: KVCacheManager, previous: StepResult | None = None
    ) -> StepResult:
        """Run one step. `previous`, a step whose tokens are still pending, may only precede
        a batch this runner `defers`: its requests' last tokens are placeholders, fed from
        the device."""
        entries = batch.entries
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        last_rows: list[int] = []
        finishing: list[Request] = []
        for request, n in entries:
            start = request.num_computed_tokens
            block_ids = kv.block_ids(request)
            input_ids.extend(request.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(_slots(block_ids, bs, start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(block_ids)
            if start + n == request.num_tokens:
                last_rows.append(len(input_ids) - 1)
                finishing.append(request)
        params = [r.params for r in finishing]
        generators = [r.generator for r in finishing]
        suppressed = [self._suppressed(r) for r in finishing]
        decodes = len(batch.decodes)
        feed = None
        if previous is not None and previous.pending is not None:
            assert self.defers(batch), "a pending step's tokens are needed on the host"
            feed = [previous.rows.get(r.request_id, -1) for r in batch.decodes]
        if self.graphs is not None and self._graphed(batch):
            # Every row decodes, so every row samples. The graph samples on the device
            # unless a row needs what it does not do: then the eager sampler takes the
            # graph's logits.
            on_device = self._on_device(finishing)
            vocab, device = self.config.model.vocab_size, torch.device(self.config.device)
            plan = SamplerPlan.of(params, vocab, device) if on_device else GREEDY
            step = self.graphs.run(
                input_ids, positions, slots, seq_lens, tables, params, generators, plan, feed
            )
            if on_device:
                rows = {r.request_id: i for i, r in enumerate(finishing)}
                return StepResult(finishing, None, self.graphs.send_tokens(step), rows)
            logits = step.logits
        else:
            with self._threads(decodes):
                hidden = self._forward(
                    input_ids, positions, slots, query_lens, seq_lens, tables, decodes
                )
                if not finishing:
                    return StepResult([], SampleResult([], []))
                (last,) = _to_device([last_rows], torch.long, hidden.device)
                logits = self.model.logits(hidden[last])
                return StepResult(finishing, self.sampler(logits, params, generators, suppressed))
        return StepResult(finishing, self.sampler(logits, params, generators, suppressed))

    @contextmanager
    def _threads(self, decodes: int) -> Iterator[None]:
        """`prefill_threads` CPU threads for a step in which nothing decodes."""
        wanted = self.config.prefill_threads
        before = torch.get_num_threads()
        if decodes or wanted is None or wanted == before or self.config.device != "cpu":
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _forward(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        num_decodes: int,
    ) -> torch.Tensor:
        """One eager forward over the step's rows (any mix of decodes and prefill chunks)."""
        device = torch.device(self.config.device)
        width = max(len(t) for t in tables)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        table: list[int] = []
        for t in tables:
            table += t + [0] * (width - len(t))
        ids_t, positions_t, slots_t = _to_device([input_ids, positions, slots], torch.long, device)
        starts_t, seq_lens_t, table_t = _to_device([starts, seq_lens, table], torch.int32, device)
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            query_start_loc=starts_t,
            seq_lens=seq_lens_t,
            block_tables=table_t.view(len(tables), width),
            num_decodes=num_decodes,
            block_size=self.block_size,
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            row_invariant=self.config.batch_invariant,
        )
        return self.model.forward(ids_t, positions_t, self.kv_cache, meta)

    def _suppressed(self, request: Request) -> tuple[int, ...]:
        p = request.params
        if request.num_output_tokens >= p.min_tokens:
            return ()
        eos = () if p.ignore_eos else self.config.model.eos_token_ids
        return eos + p.stop_token_ids


def _slots(block_ids: list[int], block_size: int, start: int, end: int) -> Iterator[int]:
    """Cache slots of positions [start, end): one range per block, not one step per token."""
    pos = start
    while pos < end:
        offset = pos % block_size
        take = min(block_size - offset, end - pos)
        first = block_ids[pos // block_size] * block_size + offset
        yield from range(first, first + take)
        pos += take


def _to_device(
    rows: list[list[int]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Host lists as tensors on `device`: on a GPU one pinned buffer and one asynchronous
    copy (separate pageable copies each waited for the host to convert its list, and
    left the GPU idle before a long prefill's first kernel), split into contiguous views."""
    values: list[int] = []
    for row in rows:
        values += row
    flat = torch.tensor(values, dtype=dtype)
    if device.type != "cpu":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(flat.split([len(row) for row in rows]))
