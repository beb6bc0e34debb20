"""A step's decoder layers on the CPU, one native call each: launcher of
`kernels/cpu/layer.cpp`.

Op by op, a batch-1 decode step of SmolLM2 made ~330 native calls and spent about half
its 30 ms between them (argument checks, tensor allocations, ctypes, the GIL taken back
after each call). The native layer runs the same kernels on the same buffers in the same
order, so its output is bit for bit the op-by-op one (tests/kernels/test_layer_cpu.py).

It serves any step (decode rows, prefill chunks, both) of a model with bf16 activations,
a bf16 or an FP8 KV cache (whose scales are checked once, here: they are fixed at load), INT4
weights in the `"avx2"` layout without biases, and no batch-invariant
splitting; `NativeLayers.
build` returns None for any other model, which then runs op by op.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from kernels import native
from kernels.attention_metadata import AttentionMetadata
from kernels.fp8_linear import FP8_DTYPE
from kernels.int4_linear import Int4Weight
from kernels.kv_cache_fp8 import check_kv_scales
from kernels.paged_attention_cpu import check_block_ids, check_slots

_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class _Int4Proj(ctypes.Structure):
    _fields_ = [
        ("qweight", _p),
        ("scales", _p),
        ("zeros", _p),
        ("n", _i64),
        ("k", _i64),
        ("group", _i64),
    ]


class _LayerWeights(ctypes.Structure):
    _fields_ = [
        ("input_norm", _p),
        ("post_norm", _p),
        ("qkv", _Int4Proj),
        ("o", _Int4Proj),
        ("gate_up", _Int4Proj),
        ("down", _Int4Proj),
        ("cache", _p),
        ("kv_scales", _p),
    ]


_BUFFERS = ("x", "residual", "h", "qkv", "q", "k", "attn", "gate_up", "act")


class _LayerStep(ctypes.Structure):
    _fields_ = [
        *[(name, _i64) for name in ("tokens", "hidden", "heads", "kv_heads", "head_dim", "inter")],
        ("eps", _f32),
        ("scale", _f32),
        ("threads", _i32),
        ("first", _i32),
        ("cos", _p),
        ("sin", _p),
        ("slots", _p),
        ("block_tables", _p),
        ("table_stride", _i64),
        ("seqs", _i64),
        ("query_start", _p),
        ("seq_lens", _p),
        ("block_stride", _i64),
        ("kv_stride", _i64),
        ("block_size", _i64),
        *[(name, _p) for name in _BUFFERS],
    ]


def _proj(w: Any) -> _Int4Proj | None:
    if not (isinstance(w, Int4Weight) and w.layout == "avx2" and w.zeros is not None):
        return None
    return _Int4Proj(
        w.qweight.data_ptr(),
        w.scales.data_ptr(),
        w.zeros.data_ptr(),
        w.out_features,
        w.in_features,
        w.group_size,
    )


class NativeLayers:
    """The native layer arguments of one model, built once; `run` serves a step."""

    def __init__(
        self, layers: list[_LayerWeights], cfg: Any, scale: float, eps: float, cache: torch.Tensor
    ) -> None:
        self._layers = layers
        self._cache = cache.data_ptr()
        self._addresses = [ctypes.addressof(layer) for layer in layers]
        self.cfg = cfg
        self._scale = scale
        self._eps = eps
        self._fn = native.lib().baton_layer_bf16

    @classmethod
    def build(cls, model: Any, kv_cache: torch.Tensor) -> NativeLayers | None:
        """The native layers of `model` (engine.model.LlamaModel) over `kv_cache`
        [blocks, layers, 2, block_size, kv_heads, head_dim], or None when any part of
        either is not what the native layer runs."""
        cfg = model.cfg
        if (
            native.library() is None
            or kv_cache.dtype not in (torch.bfloat16, FP8_DTYPE)
            or kv_cache.device.type != "cpu"
            or cfg.head_dim % 16
            or cfg.hidden_size % 8
        ):
            return None
        layers = []
        for i, layer in enumerate(model.layers):
            linears = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
            plain = (
                lin.bias is None and not lin.batch_invariant and not lin.fused_gate
                for lin in linears
            )
            if not all(plain):
                return None
            projs = [_proj(lin.stored) for lin in linears]
            norms = (layer.input_norm, layer.post_attention_norm)
            if any(p is None for p in projs) or any(n.dtype != torch.bfloat16 for n in norms):
                return None
            kv_layer = kv_cache[:, i]
            if kv_layer.stride()[2:] != (cfg.num_kv_heads * cfg.head_dim, cfg.head_dim, 1):
                return None
            scales = layer.kv_scales
            assert (scales is None) == (kv_layer.dtype == torch.bfloat16), kv_layer.dtype
            if scales is not None:
                check_kv_scales(scales, kv_layer)
                assert scales.is_contiguous() and scales.device.type == "cpu"
            layers.append(
                _LayerWeights(
                    norms[0].data_ptr(),
                    norms[1].data_ptr(),
                    *projs,
                    kv_layer.data_ptr(),
                    None if scales is None else scales.data_ptr(),
                )
            )
        return cls(layers, cfg, model.layers[0].scale, cfg.rms_norm_eps, kv_cache)

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer of a step: (x, residual) as the op-by-op loop leaves them.
        `x` (the embedding rows, bf16) is the layers' working buffer: it is overwritten."""
        cfg, t = self.cfg, x.shape[0]
        if kv_cache.data_ptr() != self._cache:  # a new cache: every layer's slice moved
            for i, layer in enumerate(self._layers):
                layer.cache = kv_cache[:, i].data_ptr()
            self._cache = kv_cache.data_ptr()
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        inter = self._layers[0].gate_up.n // 2
        hidden = cfg.hidden_size
        # in _BUFFERS order, after x
        widths = [hidden, hidden, q_size + 2 * kv_size, q_size, kv_size, q_size, 2 * inter, inter]
        buffers = [x.contiguous(), *(torch.empty((t, w), dtype=torch.bfloat16) for w in widths)]
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables, seq_lens = meta.block_tables.contiguous(), meta.seq_lens.contiguous()
        starts = meta.query_start_loc.contiguous()
        kv_layer = kv_cache[:, 0]
        check_slots(slots, kv_layer)  # every layer's slice has the same blocks
        check_block_ids(meta, kv_layer.shape[0])
        step = _LayerStep(
            t,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            inter,
            self._eps,
            self._scale,
            torch.get_num_threads(),
            1,
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            tables.stride(0),
            meta.batch_size,
            starts.data_ptr(),
            seq_lens.data_ptr(),
            kv_layer.stride(0),
            kv_layer.stride(1),
            kv_layer.shape[2],
            *[b.data_ptr() for b in buffers],
        )
        address = ctypes.addressof(step)
        for layer_address in self._addresses:
            self._fn(layer_address, address)
        return buffers[0], buffers[1]
