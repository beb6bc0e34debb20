"""Runs a model over explicit sequences with a private paged KV cache, no scheduler: what
the quality bench, the GPU engine bench and the pipeline tests drive models with."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from engine.config import ModelConfig
from engine.model import LlamaModel
from kernels.attention_metadata import AttentionMetadata

BLOCK = 16


class Runner:
    """Runs a model over explicit sequences with a private paged KV cache: sequence b
    owns a contiguous run of blocks, so any model can continue where another stopped."""

    def __init__(
        self,
        cfg: ModelConfig,
        seqs: int,
        max_len: int,
        device: str | torch.device,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.cfg = cfg
        self.per_seq = math.ceil(max_len / BLOCK)
        self.cache = torch.zeros(
            (seqs * self.per_seq, cfg.num_layers, 2, BLOCK, cfg.num_kv_heads, cfg.head_dim),
            dtype=dtype,
            device=device,
        )
        self.device = device

    @torch.inference_mode()
    def step(
        self, model: LlamaModel, chunks: list[tuple[int, list[int], int]], decodes: int
    ) -> torch.Tensor:
        """chunks: (sequence, new token ids, first position); decodes first. Hidden states."""
        return self.prepare(chunks, decodes)(model)

    @torch.inference_mode()
    def prepare(
        self, chunks: list[tuple[int, list[int], int]], decodes: int
    ) -> Callable[[LlamaModel], torch.Tensor]:
        """The step's input and metadata tensors, built now; the returned call runs a model
        on them (and can be repeated, or captured in a CUDA graph)."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        s_lens: list[int] = []
        starts = [0]
        tables = []
        for seq, tokens, start in chunks:
            base = seq * self.per_seq
            ids += tokens
            positions = range(start, start + len(tokens))
            pos += positions
            slots += [(base + p // BLOCK) * BLOCK + p % BLOCK for p in positions]
            q_lens.append(len(tokens))
            s_lens.append(start + len(tokens))
            starts.append(starts[-1] + len(tokens))
            tables.append(list(range(base, base + self.per_seq)))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(s_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            num_decodes=decodes,
            block_size=BLOCK,
            query_lens_host=q_lens,
            seq_lens_host=s_lens,
        )
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.int64, device=dev)
        return lambda model: model.forward(ids_t, pos_t, self.cache, meta)
