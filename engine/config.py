"""Internal engine configuration: frozen dataclasses validated on construction.

User-facing configuration (YAML, CLI flags, Helm values) is pydantic and lives at the
service boundary; it is turned into these before the engine sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from engine.kv_format import KVBlockFormat, check_kv_cache_dtype, kv_cache_dtype

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
"""Llama-family decoders the model implements (SmolLM2 and Llama 2/3 are `llama`)."""

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name used in configs to a torch dtype, naming the choices when unknown."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`) or linear position scaling."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(
                f"unsupported rope_scaling.rope_type {self.rope_type!r}; "
                "supported: 'llama3', 'linear'"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, independent of where it was loaded from."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"Baton serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    def check_max_model_len(self, max_model_len: int) -> None:
        """Refuses serving a context window longer than the model was trained for."""
        if max_model_len > self.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_model_len}) exceeds the model's context "
                f"window ({self.max_position_embeddings})"
            )

    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` tokens for every layer."""

    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8, got {self.block_size}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: a per-step token budget shared by prefill chunks and decodes."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an `LLMEngine` needs besides the loaded weights.

    `dtype` is the activation dtype; `kv_cache_dtype` that of the paged KV cache ("auto":
    `dtype`; "fp8" or "fp8_e4m3": fp8_e4m3 with scales calibrated at load, see
    `engine.kv_scales`). `linear` names the weight format of the decoder projections and
    `lm_head_linear` that of the LM head (see `engine.linear`).
    `batch_invariant` makes every request's arithmetic independent of its batch mates
    (see `engine.linear.Linear`), at the cost of one weight pass per row.
    `cuda_graph_max_batch` is the largest decode batch replayed from a CUDA graph on a GPU
    with the Triton backend (`engine.cuda_graphs`); 0 runs every step eagerly.
    `prefill_threads` is the CPU thread count of steps in which no sequence decodes (only
    prefill chunks), None: torch's count for every step. A decode replica that shares the
    cores with a prefill pool decodes on its share and runs its local prefills (short
    prompt tails, overflow, fallbacks) on more.
    """

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: str = "bfloat16"
    linear: str = "dense"
    lm_head_linear: str = "dense"
    kernel_backend: str = "torch"
    device: str = "cpu"
    batch_invariant: bool = False
    cuda_graph_max_batch: int = 64
    prefill_threads: int | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.prefill_threads is not None and self.prefill_threads < 1:
            raise ValueError(f"prefill_threads must be >= 1, got {self.prefill_threads}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {self.cuda_graph_max_batch}")
        self.model.check_max_model_len(self.scheduler.max_model_len)

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @cached_property
    def kv_dtype(self) -> str:
        """Wire name of the paged cache's dtype (engine.kv_format): the fingerprint's."""
        return kv_cache_dtype(self.kv_cache_dtype, self.torch_dtype)

    @cached_property
    def block_format(self) -> KVBlockFormat:
        """One block of the paged cache, as it leaves and enters the engine."""
        m = self.model
        return KVBlockFormat(
            m.num_layers, m.num_kv_heads, m.head_dim, self.cache.block_size, self.kv_dtype
        )

    @property
    def uses_cuda_graphs(self) -> bool:
        return (
            self.cuda_graph_max_batch > 0
            and torch.device(self.device).type == "cuda"
            and self.kernel_backend == "triton"
        )
