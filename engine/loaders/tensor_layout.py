"""The tensors a Llama-family checkpoint must hold, by Hugging Face name, and their shapes.

Both loaders translate their format into these names and then call `validate_tensors`, so
the model can index the dict without checking anything itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ModelConfig

_LAYER_PREFIX = "model.layers.{i}."


PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""The model's merged projections, in the order a layer runs them."""


def layer_tensors(layer: int) -> dict[str, list[str]]:
    """The checkpoint names of each merged projection of decoder `layer` (its parts, in
    the order they stack) and of its two norms."""
    p = _LAYER_PREFIX.format(i=layer)
    attn, mlp = p + "self_attn.", p + "mlp."
    return {
        "qkv_proj": [attn + f"{x}_proj.weight" for x in "qkv"],
        "o_proj": [attn + "o_proj.weight"],
        "gate_up_proj": [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
        "down_proj": [mlp + "down_proj.weight"],
        "input_layernorm": [p + "input_layernorm.weight"],
        "post_attention_layernorm": [p + "post_attention_layernorm.weight"],
    }


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, with its shape (`[out_features, in_features]` for linears)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        layer = _LAYER_PREFIX.format(i=i)
        shapes[layer + "input_layernorm.weight"] = (hidden,)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
        shapes[layer + "self_attn.q_proj.weight"] = (config.q_size, hidden)
        shapes[layer + "self_attn.k_proj.weight"] = (config.kv_size, hidden)
        shapes[layer + "self_attn.v_proj.weight"] = (config.kv_size, hidden)
        shapes[layer + "self_attn.o_proj.weight"] = (hidden, config.q_size)
        if config.qkv_bias:
            shapes[layer + "self_attn.q_proj.bias"] = (config.q_size,)
            shapes[layer + "self_attn.k_proj.bias"] = (config.kv_size,)
            shapes[layer + "self_attn.v_proj.bias"] = (config.kv_size,)
        shapes[layer + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[layer + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[layer + "mlp.down_proj.weight"] = (hidden, inter)
    return shapes


def validate_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: Path) -> None:
    """Raise ValueError naming the first missing, misshapen or unexpected tensor and the file."""
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"{source}: checkpoint is missing tensor {name!r} (shape {shape})")
        actual = tuple(tensors[name].shape)
        if actual != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {actual}, expected {shape}")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(
            f"{source}: checkpoint has tensors the {config.architecture} model does not use: "
            f"{shown}{more}"
        )
