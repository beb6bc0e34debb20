"""Per-input-channel scaling of a Llama checkpoint's projections, folded exactly.

`W x = (W diag(s)) (diag(s)^-1 x)`: a calibrated quantizer (AWQ for `int4`,
`engine.quant.awq`; SmoothQuant for `fp8`, `engine.quant.smooth`) picks s per group of
projections that share an input; `scale_checkpoint` multiplies their columns by s and
divides whatever produces the input by s, so the model computes the same function in full
precision:

    projection      its input comes from            1/s folded into
    qkv_proj        input_layernorm                 the norm weight (q, k, v share one s)
    gate_up_proj    post_attention_layernorm        the norm weight (gate, up share one s)
    down_proj       silu(gate) * up                 the up_proj rows
    o_proj          attention over v                not scaled: with grouped-query
                                                    attention one v row serves several
                                                    query heads, each with its own s
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from engine.loaders.tensor_layout import layer_tensors

Stats = TypeVar("Stats")

SCALED = ("down_proj", "gate_up_proj", "qkv_proj")
"""In this order: down's 1/s changes the up_proj rows before gate_up picks its s."""


def scale_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    num_layers: int,
    stats: Sequence[Mapping[str, Stats]],
    search: Callable[[list[torch.Tensor], Stats], torch.Tensor],
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(the checkpoint with every layer's projections scaled by `search(weights,
    stats[layer][projection])` and 1/s folded upstream, fp32 on `device`; the s chosen per
    layer and projection). Tensors outside the decoder layers are passed through."""
    t = dict(tensors)
    chosen = []
    for i in range(num_layers):
        names = layer_tensors(i)
        for name in (n for v in names.values() for n in v):
            t[name] = t[name].to(device, torch.float32)
        per_layer = {}
        for projection in SCALED:
            s = search([t[n] for n in names[projection]], stats[i][projection])
            per_layer[projection] = s
            for n in names[projection]:
                t[n] = t[n] * s
            if projection == "down_proj":
                up = names["gate_up_proj"][1]
                t[up] = t[up] / s[:, None]
            else:
                norm = names["input_layernorm" if projection == "qkv_proj" else
                             "post_attention_layernorm"][0]  # fmt: skip
                t[norm] = t[norm] / s
        chosen.append(per_layer)
    return t, chosen
