"""The knobs a user sets to build an engine, and the sizing that turns them into configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint, load_checkpoint

DEFAULT_KV_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineArgs:
    """`model` None means the embedded default (SmolLM2-135M-Instruct); `kv_cache_dtype`
    "auto" caches KV in `dtype`, "fp8"/"fp8_e4m3" in fp8_e4m3 (twice the blocks for the
    same `kv_cache_bytes`)."""

    model: str | Path | None = None
    dtype: str = "bfloat16"
    linear: str = "dense"
    lm_head_linear: str = "dense"
    kernel_backend: str = "torch"
    device: str = "cpu"
    max_model_len: int | None = None
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    batch_invariant: bool = False
    cuda_graph_max_batch: int = 64
    prefill_threads: int | None = None
    kv_cache_dtype: str = "auto"

    def engine_config(self, checkpoint: LoadedCheckpoint) -> EngineConfig:
        model = checkpoint.config
        # None, not 0, means the model's own window: SchedulerConfig refuses 0 and below.
        max_len = (
            model.max_position_embeddings if self.max_model_len is None else self.max_model_len
        )
        model.check_max_model_len(max_len)  # before sizing the KV cache to it
        config = EngineConfig(  # one block for now: validated before it sizes the cache
            model=model,
            cache=CacheConfig(1, self.block_size, self.enable_prefix_caching),
            scheduler=SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, max_len),
            dtype=self.dtype,
            linear=self.linear,
            lm_head_linear=self.lm_head_linear,
            kernel_backend=self.kernel_backend,
            device=self.device,
            batch_invariant=self.batch_invariant,
            cuda_graph_max_batch=self.cuda_graph_max_batch,
            prefill_threads=self.prefill_threads,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        # A block as the cache holds it: an fp8 block's payload carries its scales.
        num_blocks = self.kv_cache_bytes // config.block_format.nbytes
        needed = -(-max_len // self.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"kv_cache_bytes={self.kv_cache_bytes} holds {num_blocks} blocks of "
                f"{self.block_size} tokens, fewer than one {max_len}-token sequence needs "
                f"({needed}); raise kv_cache_bytes or lower max_model_len"
            )
        cache = CacheConfig(num_blocks, self.block_size, self.enable_prefix_caching)
        return dataclasses.replace(config, cache=cache)

    def create_engine(self, checkpoint: LoadedCheckpoint | None = None) -> LLMEngine:
        checkpoint = checkpoint or load_checkpoint(self.model)
        return LLMEngine(checkpoint, self.engine_config(checkpoint))
