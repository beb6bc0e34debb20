"""Per-step description of a ragged batch for paged attention.

A step's tokens are flattened: sequence b owns query rows
`query_start_loc[b]:query_start_loc[b+1]`, its keys are its first `seq_lens[b]` cached
tokens (the cached prefix plus this step's new ones), found through `block_tables[b]`.
Decode sequences (one new token) come first, so `num_decodes` splits the batch:

    rows:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ...]
            decodes    prefill chunk  prefill chunk
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset)
    query_start_loc: torch.Tensor  # [batch + 1] int32
    seq_lens: torch.Tensor  # [batch] int32: context length after this step
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    num_decodes: int
    block_size: int
    # Host copies, so CPU-side planning never syncs with the device.
    query_lens_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # Every query row attends alone, as a decode row does (the batch-invariant engine): a
    # sequence's numbers then do not depend on how its tokens were chunked into steps.
    # Honoured by the torch path; the native bf16 decode kernel still serves decode rows.
    row_invariant: bool = False
    # Backend-private per-step state (gather indices, masks, split sizes), built once
    # per step by `KernelBackend.plan_attention` and reused by every layer.
    plan: Any = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
