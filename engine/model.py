"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Every op goes through a `KernelBackend`, every projection through a `Linear` of some
weight format, so kernels and quantization change without touching this file. Q/K/V and
gate/up are merged into one projection each: fewer, larger GEMMs.

The paged cache is block-major (engine.kv_format): `kv_cache[:, layer]` is that layer's
[num_blocks, 2, block_size, num_kv_heads, head_dim] view. With `kv_scales` (an fp8_e4m3
cache, engine.kv_scales) each layer divides its K/V by its [2, num_kv_heads] slice of
them as it writes them and multiplies them back as it attends.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.config import EngineConfig, ModelConfig
from engine.linear import Linear, LinearFormat, QuantizedWeight, cat_weights, linear_format
from engine.loaders.tensor_layout import layer_tensors
from engine.rope import RotaryTable
from kernels.attention_metadata import AttentionMetadata
from kernels.backend import KernelBackend, get_backend
from kernels.fp8_linear import Fp8Rows
from kernels.layer_cpu import NativeLayers
from kernels.pending_norm import PendingNorm


class _Weights:
    """Checkpoint tensors by HF name, moved to the engine's device and dtype on demand."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor | QuantizedWeight], dtype: torch.dtype, device: str
    ):
        self.tensors = tensors
        self.dtype = dtype
        self.device = device

    def raw(self, name: str) -> torch.Tensor | QuantizedWeight:
        """A projection weight as the checkpoint holds it (the Linear's format converts it)."""
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must stay full precision, but it was quantized as {t.format}")
        return t.to(device=self.device, dtype=self.dtype)

    def cat(self, names: list[str]) -> torch.Tensor | QuantizedWeight:
        return cat_weights([self.tensors[n] for n in names])

    def has(self, name: str) -> bool:
        return name in self.tensors


class DecoderLayer:
    def __init__(
        self,
        cfg: ModelConfig,
        w: _Weights,
        i: int,
        fmt: LinearFormat,
        ops: KernelBackend,
        batch_invariant: bool,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        names = layer_tensors(i)

        def linear(
            weight: torch.Tensor | QuantizedWeight,
            bias: torch.Tensor | None = None,
            gated: bool = False,
        ) -> Linear:
            return Linear(weight, bias, fmt, ops, w.dtype, w.device, batch_invariant, gated)

        qkv = names["qkv_proj"]
        biases = [n.replace(".weight", ".bias") for n in qkv]
        bias = torch.cat([w.get(n) for n in biases]) if cfg.qkv_bias else None
        self.qkv_proj = linear(w.cat(qkv), bias)
        (o,) = names["o_proj"]
        self.o_proj = linear(w.raw(o))
        self.gate_up_proj = linear(w.cat(names["gate_up_proj"]), gated=True)  # silu(g) * u
        (down,) = names["down_proj"]
        self.down_proj = linear(w.raw(down))
        self.input_norm = w.get(names["input_layernorm"][0])
        self.post_attention_norm = w.get(names["post_attention_layernorm"][0])
        self.cfg = cfg
        self.ops = ops
        self.scale = cfg.head_dim**-0.5
        self.kv_scales = kv_scales
        """This layer's [2, num_kv_heads] fp32 scales of an fp8 cache, else None."""
        self.takes_fp8 = self.qkv_proj.takes_fp8
        """Whether this layer's input should come quantized from the norm before it."""
        self.fp8_mlp = self.gate_up_proj.takes_fp8
        self.fp8_down = self.down_proj.takes_fp8

    def __call__(
        self,
        h: torch.Tensor | PendingNorm | Fp8Rows,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        next_norm: torch.Tensor | None,
        next_fp8: bool = False,
    ) -> tuple[torch.Tensor | PendingNorm | Fp8Rows, torch.Tensor]:
        """`h` is this layer's input, already normed by its `input_norm` (left pending where
        the projections can finish a norm, `Linear.add_norm`; quantized where they take
        `Fp8Rows`), and `residual` the stream it was normed from. Returns (the new stream
        normed by `next_norm`, the next layer's input norm, quantized with `next_fp8`; the
        new stream) or, with `next_norm` None, (this layer's MLP output; the stream without
        it), for the model's final norm to add and norm."""
        cfg, ops = self.cfg, self.ops
        q, k, v = self.qkv_proj(h).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        t = q.shape[0]
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        attn = ops.rope_attention(q, k, v, cos, sin, kv_layer, meta, self.scale, self.kv_scales)
        h, residual = self.o_proj.add_norm(
            attn.reshape(t, cfg.q_size),
            residual,
            self.post_attention_norm,
            cfg.rms_norm_eps,
            fp8_out=self.fp8_mlp,
        )
        gate_up = self.gate_up_proj
        mlp = gate_up.quantized(h) if self.fp8_down else gate_up(h)  # silu(gate) * up
        if next_norm is None:
            return self.down_proj(mlp), residual
        return self.down_proj.add_norm(mlp, residual, next_norm, cfg.rms_norm_eps, next_fp8)


class LlamaModel:
    """Embedding, decoder layers, final norm and LM head; `kv_scales` [num_layers, 2,
    num_kv_heads] fp32 for an fp8_e4m3 cache (engine.kv_scales), else None."""

    def __init__(
        self,
        config: EngineConfig,
        tensors: Mapping[str, torch.Tensor | QuantizedWeight],
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        cfg = config.model
        assert (kv_scales is not None) == (config.kv_dtype == "fp8_e4m3"), config.kv_dtype
        # One static tensor the layers view (a CUDA graph captures their addresses).
        self.kv_scales = None if kv_scales is None else kv_scales.to(config.device).contiguous()
        if self.kv_scales is not None:
            assert self.kv_scales.dtype == torch.float32, self.kv_scales.dtype
            assert self.kv_scales.shape == config.block_format.scales_shape, self.kv_scales.shape
        self.cfg = cfg
        self.ops = get_backend(config.kernel_backend)
        w = _Weights(tensors, config.torch_dtype, config.device)
        fmt = linear_format(config.linear)
        self.format = fmt
        self.embed = w.get("model.embed_tokens.weight")
        invariant = config.batch_invariant
        scales = self.kv_scales
        self.layers = [
            DecoderLayer(cfg, w, i, fmt, self.ops, invariant, None if scales is None else scales[i])
            for i in range(cfg.num_layers)
        ]
        self.norm = w.get("model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        head_fmt = linear_format(config.lm_head_linear)
        self.lm_head = Linear(w.raw(head), None, head_fmt, self.ops, w.dtype, w.device, invariant)
        self.rotary = RotaryTable(cfg, config.scheduler.max_model_len, config.device)
        self.native_layers = True
        """Whether steps may run each layer as one native call (on by default)."""
        self._native: NativeLayers | bool | None = None  # False: this model cannot

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm; K/V written to the cache."""
        x = self.embed[input_ids]
        cos, sin = self.rotary.lookup(positions)
        self.ops.plan_attention(meta)
        eps = self.cfg.rms_norm_eps
        layers = self._native_path(x, kv_cache)
        if layers is not None:
            x, residual = layers.run(x, cos, sin, kv_cache, meta)
        else:
            # Each layer norms the next one's input (leaving the norm pending for its GEMMs
            # where they can finish it); the last one's output takes the final norm.
            h: torch.Tensor | PendingNorm | Fp8Rows
            first = self.layers[0]
            if first.takes_fp8:  # the norm quantizes for the FP8 GEMM (`Linear.add_norm`)
                q, scale, residual = self.ops.rms_norm_fp8(x, first.input_norm, eps)
                h = Fp8Rows(q, scale, x.dtype)
            else:
                h, residual = self.ops.rms_norm(x, first.input_norm, eps)
            nexts: list[tuple[torch.Tensor | None, bool]] = [
                (layer.input_norm, layer.takes_fp8) for layer in self.layers[1:]
            ]
            nexts.append((None, False))
            for i, (layer, (norm, fp8)) in enumerate(zip(self.layers, nexts, strict=True)):
                h, residual = layer(h, residual, cos, sin, kv_cache[:, i], meta, norm, fp8)
            assert isinstance(h, torch.Tensor)
            x = h
        x, _ = self.ops.rms_norm(x, self.norm, eps, residual)
        return x

    def _native_path(self, x: torch.Tensor, kv_cache: torch.Tensor) -> NativeLayers | None:
        """The one-call-per-layer CPU path, for a model it can run (kernels.layer_cpu);
        None: op by op."""
        if (
            not self.native_layers
            or self.ops.name != "torch"
            or x.dtype != torch.bfloat16
            or x.device.type != "cpu"
        ):
            return None
        if self._native is None:
            self._native = NativeLayers.build(self, kv_cache) or False
        return self._native if isinstance(self._native, NativeLayers) else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
