"""Scales of the FP8 KV cache: one fp32 per (layer, K|V, KV head), calibrated at load.

    scale[l, kv, h] = 2 ** ceil(log2(HEADROOM * amax[l, kv, h] / 448))

`amax` is the largest |value| the full-precision model writes into that layer's K (after
RoPE) or V of that head while reading the first `CALIBRATION_TOKENS` tokens of the text
the calibrated quantizers use (`engine.quant.CALIBRATION_TEXT`); the cache then holds
fp8_e4m3(value / scale) (kernels.kv_cache_fp8).

The scales are a pure function of (the checkpoint's tensors and tokenizer, the shipped
text): the pass runs the unquantized checkpoint tensors in fp32 with the torch ops on the
CPU, whatever the engine's device, dtype, weight format or kernel backend. So a prefill
pool (FP8 weights) and a decode pool (INT4 weights) of one checkpoint derive the same
scales and hand blocks over (the weights digest in the fingerprint names the
checkpoint; the text and this recipe are Baton's, and a receiver compares the scales a
block carries with its own anyway, engine.kv_port).

Why powers of two: dividing by one is exact, so every backend caches the same fp8 byte
for a value, and the floating-point noise between machines (BLAS kernels, thread
counts; ~1e-6 relative in fp32) moves a scale only if its amax lies that close to a
power-of-two boundary. Why HEADROOM: e4m3 keeps the same relative precision (3 mantissa
bits) for |x| / scale anywhere in [2^-6, 448], so headroom is nearly free: the calibrated
amax lands at 1/4 to 1/2 of 448, and K/V up to 2-4 times larger than any in the
calibration prose (code, other languages) are cached unclipped, while only values below
about amax / 2^13 lose precision as subnormals, far under what attention can resolve.
"""

from __future__ import annotations

import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.loaders import LoadedCheckpoint
from engine.model import LlamaModel
from engine.quant import CALIBRATION_TEXT
from kernels.attention_metadata import AttentionMetadata
from kernels.fp8_linear import FP8_MAX

CALIBRATION_TOKENS = 256
"""Tokens of calibration text one pass reads (fewer where the model's window is shorter)."""
MIN_CALIBRATION_TOKENS = 64
"""Fewer distinct ids than this among the calibration tokens (a tokenizer that reads the
prose as a handful of tokens, or as one unknown id repeated) would give scales that say
nothing about the K/V the model writes: refused."""
HEADROOM = 2.0
_BLOCK = 16


@torch.inference_mode()
def kv_amax(checkpoint: LoadedCheckpoint) -> torch.Tensor:
    """max |K| (after RoPE) and |V| per (layer, K|V, KV head), [num_layers, 2, num_kv_heads]
    fp32, over the calibration tokens read by the full-precision model from position 0."""
    cfg = checkpoint.config
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    tokens = checkpoint.tokenizer.encode(text)
    tokens = tokens[: min(CALIBRATION_TOKENS, cfg.max_position_embeddings)]
    n, distinct = len(tokens), len(set(tokens))
    if distinct < MIN_CALIBRATION_TOKENS:
        raise ValueError(
            f"the FP8 KV cache calibrates its scales on {CALIBRATION_TEXT.name}, which this "
            f"model's tokenizer reads as {n} tokens, {distinct} of them distinct (at least "
            f"{MIN_CALIBRATION_TOKENS} distinct needed); use kv_cache_dtype auto with this "
            "tokenizer"
        )
    blocks = -(-n // _BLOCK)
    config = EngineConfig(
        model=cfg,
        cache=CacheConfig(blocks, _BLOCK, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=n, max_model_len=n),
        dtype="float32",
        kernel_backend="torch",
        device="cpu",
    )
    model = LlamaModel(config, checkpoint.tensors)
    cache = config.block_format.empty_blocks(blocks, "cpu")  # zeros: no |value| below 0
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        num_decodes=0,
        block_size=_BLOCK,
        query_lens_host=[n],
        seq_lens_host=[n],
    )
    model.forward(torch.tensor(tokens), torch.arange(n), cache, meta)
    # cache [blocks, layers, K|V, block_size, kv_heads, head_dim]
    return cache.abs().amax(dim=(0, 3, 5))


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The power-of-two scales (fp32, amax's shape) that put HEADROOM * amax at or under 448."""
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("the model's K/V on the calibration text are not finite: bad weights?")
    tiny = torch.finfo(torch.float32).tiny  # a head that never writes a non-zero value
    ratio = (amax.double() * HEADROOM / FP8_MAX).clamp_min(tiny)
    return torch.exp2(torch.ceil(torch.log2(ratio))).float()


def calibrate_kv_scales(checkpoint: LoadedCheckpoint) -> torch.Tensor:
    """This checkpoint's FP8 KV cache scales, [num_layers, 2, num_kv_heads] fp32 on the CPU."""
    return scales_from_amax(kv_amax(checkpoint))
