"""Quality of the quantized formats on the default model (issue 3).

    python bench/quality.py                      # CPU, torch backend (the embedded default)
    python bench/quality.py --device cuda --backend triton

Reports perplexity on `engine/quant/data/heldout.txt` for bf16 (dense), FP8 rounded to
nearest and by GPTQ, INT4-RTN and INT4-AWQ (both calibrated on `calibration.txt`), and the
greedy agreement with bf16 of the disaggregated pipeline: FP8-GPTQ prefill writes the KV
cache, INT4-AWQ decode continues from it.

The calibration here is the plumbing the engine will need: the dense model runs over the
calibration text with each projection's input shown to an observer (`calibrate`). GPTQ
(`engine.quant.gptq`) rounds every decoder projection to FP8 against its input Hessian
and leaves `Fp8Channels` in the checkpoint, which the `fp8` format serves as they are.
For AWQ, each projection's input is recorded (`ActivationStats`), then
`engine.quant.awq.awq_transform` rewrites the checkpoint tensors (scaled and clipped
weights; 1/s folded into the RMSNorm weights and the up_proj rows) before an `int4` model
is built from them. o_proj stays round-to-nearest: SmolLM2 shares KV heads (GQA), so its
input scale has nowhere exact to fold.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paged_runner import Runner  # noqa: E402
from engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from engine.linear import QuantizedWeight  # noqa: E402
from engine.loaders import LoadedCheckpoint, load_checkpoint  # noqa: E402
from engine.model import LlamaModel  # noqa: E402
from engine.quant.awq import ActivationStats, awq_transform  # noqa: E402
from engine.quant.fp8 import Fp8Channels, quantize_fp8_per_channel  # noqa: E402
from engine.quant.gptq import Hessian, gptq_fp8  # noqa: E402

DATA = ROOT / "engine" / "quant" / "data"
WINDOW = 1024


def build(
    ck: LoadedCheckpoint,
    tensors: Mapping[str, torch.Tensor | QuantizedWeight],
    linear: str,
    args: argparse.Namespace,
) -> LlamaModel:
    config = EngineConfig(
        model=ck.config,
        cache=CacheConfig(num_blocks=1),
        scheduler=SchedulerConfig(max_model_len=4 * WINDOW),
        dtype="bfloat16",
        linear=linear,
        kernel_backend=args.backend,
        device=args.device,
    )
    return LlamaModel(config, tensors)


@torch.inference_mode()
def perplexity(model: LlamaModel, runner: Runner, tokens: list[int]) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each read from position 0."""
    nll, count = 0.0, 0
    for lo in range(0, len(tokens) - 1, WINDOW):
        window = tokens[lo : lo + WINDOW + 1]
        hidden = runner.step(model, [(0, window[:-1], 0)], 0)
        logits = model.logits(hidden).float()
        target = torch.tensor(window[1:], device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(window) - 1
    return math.exp(nll / count)


@torch.inference_mode()
def greedy(
    prefill: LlamaModel, decode: LlamaModel, runner: Runner, prompts: list[list[int]], new: int
) -> list[list[int]]:
    """Greedy continuation of every prompt in one batch: `prefill` reads the prompts and
    writes their KV, `decode` produces every later token from that cache."""
    n = len(prompts)
    hidden = runner.step(prefill, [(b, p, 0) for b, p in enumerate(prompts)], 0)
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    out = [[int(t)] for t in prefill.logits(hidden[last.to(hidden.device)]).argmax(-1)]
    for i in range(new - 1):
        chunks = [(b, [out[b][-1]], len(prompts[b]) + i) for b in range(n)]
        tokens = decode.logits(runner.step(decode, chunks, n)).argmax(-1)
        for b in range(n):
            out[b].append(int(tokens[b]))
    return out


class _Observer(Protocol):
    def observe(self, x: torch.Tensor) -> None: ...


class _Recorder:
    """Stands in for a projection during calibration, showing its input rows to `observer`."""

    def __init__(self, linear: Callable[[torch.Tensor], torch.Tensor], observer: _Observer):
        self.linear, self.observer = linear, observer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.observe(x)
        return self.linear(x)


PARTS = {
    "qkv_proj": [f"self_attn.{x}_proj.weight" for x in "qkv"],
    "o_proj": ["self_attn.o_proj.weight"],
    "gate_up_proj": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "down_proj": ["mlp.down_proj.weight"],
}
"""The model's merged projections and the checkpoint tensors each is made of."""

Obs = TypeVar("Obs", bound=_Observer)


def calibrate(
    ck: LoadedCheckpoint, args: argparse.Namespace, observer: Callable[[int], Obs], names: list[str]
) -> list[dict[str, Obs]]:
    """Run the dense model over calibration.txt; per layer, an observer of each named
    projection's input rows."""
    model = build(ck, ck.tensors, "dense", args)
    seen = []
    for layer in model.layers:
        per_layer = {}
        for name in names:
            linear = getattr(layer, name)
            per_layer[name] = observer(linear.in_features)
            setattr(layer, name, _Recorder(linear, per_layer[name]))
        seen.append(per_layer)
    tokens = ck.tokenizer.encode((DATA / "calibration.txt").read_text())
    runner = Runner(ck.config, 1, WINDOW, args.device)
    for lo in range(0, len(tokens), WINDOW):
        runner.step(model, [(0, tokens[lo : lo + WINDOW], 0)], 0)
    return seen


def awq_tensors(ck: LoadedCheckpoint, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The checkpoint rewritten by AWQ, calibrated with the dense model on calibration.txt."""
    stats = calibrate(ck, args, ActivationStats, ["qkv_proj", "gate_up_proj", "down_proj"])
    t = dict(ck.tensors)
    for i, s in enumerate(stats):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        # down first: its 1/s folds into the up_proj rows, which gate_up then quantizes.
        (down,), s_down = awq_transform([t[mlp + "down_proj.weight"]], s["down_proj"])
        t[mlp + "down_proj.weight"] = down
        t[mlp + "up_proj.weight"] = t[mlp + "up_proj.weight"].float() / s_down[:, None]
        names = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        new, s_gu = awq_transform([t[n] for n in names], s["gate_up_proj"])
        t.update(zip(names, new, strict=True))
        norm = p + "post_attention_layernorm.weight"
        t[norm] = t[norm].float() / s_gu
        names = [attn + f"{x}_proj.weight" for x in "qkv"]
        new, s_qkv = awq_transform([t[n] for n in names], s["qkv_proj"])
        t.update(zip(names, new, strict=True))
        t[p + "input_layernorm.weight"] = t[p + "input_layernorm.weight"].float() / s_qkv
    return t


def fp8_tensors(
    ck: LoadedCheckpoint, hessians: list[dict[str, Hessian]] | None, eps: float = 0.0
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The checkpoint with every decoder projection as `Fp8Channels`: rounded by GPTQ
    against its input Hessian when `hessians` are given (rows of a merged projection are
    independent in GPTQ, so each checkpoint tensor is rounded on its own with the shared
    Hessian), else to nearest. `eps` multiplies the weight by 1 + eps before rounding and
    divides the scales by it after: the same model on a slightly shifted FP8 grid, whose
    spread of perplexities is this measurement's noise (`--spread`)."""
    t: dict[str, torch.Tensor | QuantizedWeight] = dict(ck.tensors)
    for i in range(ck.config.num_layers):
        for projection, parts in PARTS.items():
            for part in parts:
                name = f"model.layers.{i}.{part}"
                w = ck.tensors[name].float() * (1 + eps)
                if hessians is None:
                    q = Fp8Channels(*quantize_fp8_per_channel(w))
                else:
                    q = gptq_fp8(w, hessians[i][projection].matrix)
                t[name] = Fp8Channels(q.q, q.scale / (1 + eps))
    return t


def prompts_from(text: str, ck: LoadedCheckpoint, count: int, length: int) -> list[list[int]]:
    """`count` prompts: the first `length` tokens after evenly spaced sentence starts."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 12]
    step = max(1, len(sentences) // count)
    picked = sentences[::step][:count]
    return [ck.tokenizer.encode(s)[:length] for s in picked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--spread", action="store_true", help="also FP8 on grids shifted by 0.1%% and 0.3%%"
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    ck = load_checkpoint()
    held = ck.tokenizer.encode((DATA / "heldout.txt").read_text())
    runner = Runner(ck.config, 1, WINDOW, args.device)
    print(f"{ck.model_id}: held-out {len(held)} tokens; device {args.device}, {args.backend}")

    hessians = calibrate(ck, args, Hessian, list(PARTS))
    models = {
        "bf16": build(ck, ck.tensors, "dense", args),
        "fp8": build(ck, ck.tensors, "fp8", args),
        "fp8-gptq": build(ck, fp8_tensors(ck, hessians), "fp8", args),
        "int4-rtn": build(ck, ck.tensors, "int4", args),
        "int4-awq": build(ck, awq_tensors(ck, args), "int4", args),
    }
    ppl = {name: perplexity(m, runner, held) for name, m in models.items()}
    for name, value in ppl.items():
        delta = value / ppl["bf16"] - 1
        print(f"  perplexity {name:<9} {value:8.3f}  ({delta:+.2%} vs bf16)", flush=True)
    for eps in (1e-3, 3e-3) if args.spread else ():
        for name, h in (("fp8", None), ("fp8-gptq", hessians)):
            value = perplexity(build(ck, fp8_tensors(ck, h, eps), "fp8", args), runner, held)
            delta = value / ppl["bf16"] - 1
            print(f"  perplexity {name:<9} {value:8.3f}  ({delta:+.2%} vs bf16), grid x(1+{eps:g})")

    prompts = prompts_from((DATA / "heldout.txt").read_text(), ck, args.prompts, 24)
    runner = Runner(ck.config, len(prompts), 24 + args.new_tokens, args.device)
    ref = greedy(models["bf16"], models["bf16"], runner, prompts, args.new_tokens)
    pipe = greedy(models["fp8-gptq"], models["int4-awq"], runner, prompts, args.new_tokens)
    same = [next((i for i, (a, b) in enumerate(zip(r, q, strict=True)) if a != b), len(r))
            for r, q in zip(ref, pipe, strict=True)]  # fmt: skip
    exact = sum(s == args.new_tokens for s in same)
    tokens_agree = sum(s for s in same) / (len(same) * args.new_tokens)
    print(f"  greedy fp8-gptq-prefill + int4-awq-decode vs bf16 ({len(prompts)} prompts x "
          f"{args.new_tokens} tokens): {exact}/{len(prompts)} identical, "
          f"{tokens_agree:.1%} of tokens before the first divergence")  # fmt: skip
    print(f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
