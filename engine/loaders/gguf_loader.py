"""Load a llama.cpp GGUF checkpoint: config from metadata, dequantized tensors in HF layout.

Two things differ from a Hugging Face checkpoint besides the names:

* llama.cpp's converter interleaves the rows of each `llama` head's Q and K projections,
  because ggml's rotary embedding rotates adjacent pairs (x0, x1), (x2, x3), ... while HF's
  rotate-half pairs x[i] with x[i + head_dim/2]. Per head the GGUF rows are
  [0, d/2, 1, d/2+1, ...] of the HF rows; `_unpermute_rope_rows` restores HF order so the
  model's rotate-half RoPE applies. (`qwen2` GGUFs are stored in HF order: no permutation.)
* Llama 3.1's rope scaling is stored as per-frequency divisors (`rope_freqs.weight`), not
  as parameters; `_llama3_rope_scaling` recovers the parameters from them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from engine.loaders.checkpoint import LoadedCheckpoint
from engine.loaders.gguf_file import GGUFFile
from engine.loaders.gguf_tokenizer import gguf_tokenizer
from engine.loaders.tensor_layout import validate_tensors
from engine.loaders.weights_digest import weights_digest
from engine.tokenizer import Tokenizer

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_ORIGINAL_CONTEXT = 8192  # every Llama 3.x; the divisors do not encode it
_LOAD_THREADS = min(4, os.cpu_count() or 1)  # numpy dequantization releases the GIL


def load_gguf(path: Path, dtype: torch.dtype) -> LoadedCheckpoint:
    """A GGUF file's checkpoint; its model id is `general.name`, else the file's stem."""
    gguf = GGUFFile(path)
    arch = gguf.get_str("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported architecture {arch!r} (GGUF general.architecture); "
            f"Baton serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tokenizer = gguf_tokenizer(gguf)
    config = _model_config(gguf, arch, tokenizer)
    names = {name: _hf_name(name) for name in gguf.tensors if name != _ROPE_FREQS}

    def load(gguf_name: str) -> torch.Tensor:
        values = gguf.dequantize(gguf_name)
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            values = _unpermute_rope_rows(values, config.num_heads)
        elif arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            values = _unpermute_rope_rows(values, config.num_kv_heads)
        return torch.from_numpy(values).to(dtype)

    with ThreadPoolExecutor(_LOAD_THREADS) as pool:
        tensors = dict(zip(names.values(), pool.map(load, names), strict=True))
    validate_tensors(tensors, config, path)
    model_id = gguf.get_str("general.name") if "general.name" in gguf else path.stem
    return LoadedCheckpoint(config, tensors, tokenizer, model_id, weights_digest([path]), path)


def _model_config(gguf: GGUFFile, arch: str, tokenizer: Tokenizer) -> ModelConfig:
    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = gguf.get_int(key("embedding_length"))
    num_heads = gguf.get_int(key("attention.head_count"))
    head_dim = gguf.get_int(key("attention.key_length"), hidden // num_heads)
    rope_dim = gguf.get_int(key("rope.dimension_count"), head_dim)
    if rope_dim != head_dim:
        raise ValueError(
            f"{gguf.path}: rope.dimension_count {rope_dim} != head_dim {head_dim}; "
            "partial rotary embeddings are not supported"
        )
    if "token_embd.weight" not in gguf.tensors:
        raise ValueError(f"{gguf.path}: checkpoint is missing tensor 'token_embd.weight'")
    rope_theta = gguf.get_float(key("rope.freq_base"), 10000.0)
    intermediate = gguf.get_int(key("feed_forward_length"))
    num_layers = gguf.get_int(key("block_count"))
    num_kv_heads = gguf.get_int(key("attention.head_count_kv"), num_heads)
    context = gguf.get_int(key("context_length"))
    eps = gguf.get_float(key("attention.layer_norm_rms_epsilon"))
    rope_scaling = _rope_scaling(gguf, arch, rope_theta, head_dim)
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=gguf.tensors["token_embd.weight"].shape[0],
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=context,
            rms_norm_eps=eps,
            rope_theta=rope_theta,
            tie_word_embeddings="output.weight" not in gguf.tensors,
            qkv_bias="blk.0.attn_q.bias" in gguf.tensors,
            rope_scaling=rope_scaling,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_ids=tokenizer.eos_token_ids,
        )
    except ValueError as e:  # ModelConfig names the field; add the file
        raise ValueError(f"{gguf.path}: {e}") from e


def _hf_name(gguf_name: str) -> str:
    """HF name of a GGUF tensor; unknown names pass through, so validation names them."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        _, layer, rest = parts
        return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    return gguf_name


def _unpermute_rope_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, GGUF row 2i+j is HF row i + j*d/2."""
    half = values.shape[0] // num_heads // 2
    heads = values.reshape(num_heads, half, 2, *values.shape[1:])
    return np.ascontiguousarray(heads.swapaxes(1, 2)).reshape(values.shape)


def _rope_scaling(
    gguf: GGUFFile, arch: str, rope_theta: float, head_dim: int
) -> RopeScaling | None:
    scaling_type = gguf.get_str(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        return RopeScaling("linear", gguf.get_float(f"{arch}.rope.scaling.factor"))
    if scaling_type != "none":
        raise ValueError(
            f"{gguf.path}: rope scaling type {scaling_type!r} is not supported; "
            "supported: 'linear' and Llama 3's (rope_freqs)"
        )
    if _ROPE_FREQS not in gguf.tensors:
        return None
    return _llama3_rope_scaling(gguf.dequantize(_ROPE_FREQS), rope_theta, head_dim, gguf.path)


def _llama3_rope_scaling(
    divisors: np.ndarray, rope_theta: float, head_dim: int, path: Path
) -> RopeScaling:
    """Recover Llama 3 rope-scaling parameters from llama.cpp's per-frequency divisors.

    A divisor is 1 for short wavelengths, `factor` for long ones, and in between
    1 / ((1 - s) / factor + s) with s = (C / wavelen - low) / (high - low), C the original
    context. s is linear in C / wavelen, so two in-between divisors give low and high.
    """
    wavelen = 2 * np.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    divisors = divisors.astype(np.float64)
    factor = float(divisors.max())
    low, high = 1.0, 4.0  # Llama 3.1's, kept when no divisor falls in between
    between = (divisors > 1 + 1e-4) & (divisors < factor - 1e-4)
    if factor > 1 and between.sum() >= 2:
        s = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(_LLAMA3_ORIGINAL_CONTEXT / wavelen[between], s, 1)
        low = float(-intercept / slope)
        high = float(low + 1 / slope)
    scaling = RopeScaling("llama3", factor, low, high, _LLAMA3_ORIGINAL_CONTEXT)
    if not np.allclose(_llama3_divisors(scaling, wavelen), divisors, rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs.weight does not follow Llama 3 rope scaling")
    return scaling


def _llama3_divisors(scaling: RopeScaling, wavelen: np.ndarray) -> np.ndarray:
    context = scaling.original_max_position_embeddings
    s = (context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smooth = 1 / ((1 - s) / scaling.factor + s)
    long_wave = wavelen > context / scaling.low_freq_factor
    short_wave = wavelen < context / scaling.high_freq_factor
    return np.where(short_wave, 1.0, np.where(long_wave, scaling.factor, smooth))
