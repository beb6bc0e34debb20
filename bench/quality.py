"""Quality of the quantized formats on the default model (issue 3).

    python bench/quality.py                      # CPU, torch backend (the embedded default)
    python bench/quality.py --device cuda        # the same torch ops on a GPU
    python bench/quality.py --only bf16,int4-rtn,int4-awq --threads 16

Reports perplexity on `engine/quant/data/alice29.txt` (39k tokens) for bf16 (dense) and
every quantized model below, each with the standard error of its difference from bf16
(windows paired), and the greedy agreement with bf16 of the disaggregated pipeline:
FP8-smooth prefill writes the KV cache, INT4-AWQ-GPTQ decode continues from it.

    bf16            dense bf16
    fp8             FP8 round to nearest (the format's default)
    fp8-w, fp8-a    diagnostics: FP8 weights with bf16 activations, and the reverse
    fp8-gptq        FP8 weights rounded by GPTQ (`engine.quant.gptq`)
    fp8-smooth      SmoothQuant scaling (`engine.quant.smooth`), then round to nearest
    int4-rtn        INT4 round to nearest (the format's default)
    int4-awq        AWQ scales and clipping (`engine.quant.awq`), then round to nearest
    int4-awq-gptq   AWQ scales and clipping, then GPTQ rounding (`gptq_int4`)
    kv-fp8          dense bf16 weights over an fp8_e4m3 KV cache (`engine.kv_scales`)

Calibration runs the dense model over `calibration.txt` with each projection's input
shown to an observer (`calibrate`): `Hessian`s for GPTQ, `ActivationStats` for the scale
and clip searches. Scales fold into the norms and up_proj rows (`engine.quant.scaling`);
o_proj is never scaled (grouped-query attention leaves its input scale nowhere exact to
fold), but AWQ clips and GPTQ rounds it like the rest. The quantized weights reach the
model as `Fp8Channels` / `Int4Groups`, which the formats serve as they are.
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
from engine.kv_scales import calibrate_kv_scales  # noqa: E402
from engine.linear import Linear, QuantizedWeight  # noqa: E402
from engine.loaders import LoadedCheckpoint, load_checkpoint  # noqa: E402
from engine.loaders.tensor_layout import PROJECTIONS, layer_tensors  # noqa: E402
from engine.model import LlamaModel  # noqa: E402
from engine.quant import CALIBRATION_TEXT  # noqa: E402
from engine.quant.awq import ActivationStats, search_clip, search_scales  # noqa: E402
from engine.quant.fp8 import Fp8Channels, quantize_fp8_per_channel  # noqa: E402
from engine.quant.gptq import Hessian, gptq_fp8, gptq_int4  # noqa: E402
from engine.quant.int4 import quantize_int4  # noqa: E402
from engine.quant.scaling import scale_checkpoint  # noqa: E402
from engine.quant.smooth import smooth_scales  # noqa: E402
from kernels.fp8_linear import quantize_fp8_torch  # noqa: E402

DATA = ROOT / "engine" / "quant" / "data"
HELD_OUT = "alice29.txt"
WINDOW = 1024
SAMPLE_ROWS = 4096
"""Calibration rows each projection's scale search sees."""


def build(
    ck: LoadedCheckpoint,
    tensors: Mapping[str, torch.Tensor | QuantizedWeight],
    linear: str,
    args: argparse.Namespace,
    kv_scales: torch.Tensor | None = None,
) -> LlamaModel:
    config = EngineConfig(
        model=ck.config,
        cache=CacheConfig(num_blocks=1),
        scheduler=SchedulerConfig(max_model_len=4 * WINDOW),
        dtype="bfloat16",
        linear=linear,
        kernel_backend=args.backend,
        device=args.device,
        kv_cache_dtype="auto" if kv_scales is None else "fp8_e4m3",
    )
    return LlamaModel(config, tensors, kv_scales)


@torch.inference_mode()
def window_nll(model: LlamaModel, runner: Runner, tokens: list[int]) -> torch.Tensor:
    """[windows, 2] (summed next-token NLL, tokens) over non-overlapping windows, each read
    from position 0."""
    rows = []
    for lo in range(0, len(tokens) - 1, WINDOW):
        window = tokens[lo : lo + WINDOW + 1]
        hidden = runner.step(model, [(0, window[:-1], 0)], 0)
        logits = model.logits(hidden).float()
        target = torch.tensor(window[1:], device=logits.device)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        rows.append((float(nll), len(window) - 1))
    return torch.tensor(rows, dtype=torch.float64)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(float(nll[:, 0].sum() / nll[:, 1].sum()))


def paired_se(nll: torch.Tensor, ref: torch.Tensor) -> float:
    """Standard error of log(ppl / ppl_ref) with windows as the paired units, as a ratio."""
    w = nll[:, 1] / nll[:, 1].sum()
    d = (nll[:, 0] - ref[:, 0]) / nll[:, 1]
    mean = (w * d).sum()
    return math.expm1(float(((d - mean).pow(2) * w).sum().sqrt()) / math.sqrt(len(d) - 1))


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


class _StandIn:
    """Stands in for a model's `Linear`: its call is the subclass's, and `add_norm` (the
    model's residual add and next RMSNorm after it) follows from that call."""

    def __init__(self, linear: Linear) -> None:
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        eps: float,
        fp8_out: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert not fp8_out, "stand-ins serve dense models"
        return self.linear.ops.rms_norm(self(x), gamma, eps, residual)


class _Recorder(_StandIn):
    """Stands in for a projection during calibration, showing its input rows to `observer`."""

    def __init__(self, linear: Linear, observer: _Observer):
        super().__init__(linear)
        self.observer = observer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.observe(x)
        return self.linear(x)


Obs = TypeVar("Obs", bound=_Observer)


def calibrate(
    ck: LoadedCheckpoint, args: argparse.Namespace, observer: Callable[[int], Obs], names: list[str]
) -> list[dict[str, Obs]]:
    """Run the dense model over calibration.txt; per layer, an observer of each named
    projection's input rows."""
    model = build(ck, ck.tensors, "dense", args)
    model.native_layers = False  # the stand-ins must see every projection's call
    seen = []
    for layer in model.layers:
        per_layer = {}
        for name in names:
            linear = getattr(layer, name)
            per_layer[name] = observer(linear.in_features)
            setattr(layer, name, _Recorder(linear, per_layer[name]))
        seen.append(per_layer)
    tokens = ck.tokenizer.encode(CALIBRATION_TEXT.read_text())
    runner = Runner(ck.config, 1, WINDOW, args.device)
    for lo in range(0, len(tokens), WINDOW):
        runner.step(model, [(0, tokens[lo : lo + WINDOW], 0)], 0)
    return seen


def smooth_tensors(
    ck: LoadedCheckpoint, stats: list[dict[str, ActivationStats]], device: str
) -> dict[str, torch.Tensor]:
    """The checkpoint with SmoothQuant's scales folded in, for the `fp8` format."""
    return scale_checkpoint(ck.tensors, ck.config.num_layers, stats, smooth_scales, device)[0]


def awq_tensors(
    ck: LoadedCheckpoint,
    stats: list[dict[str, ActivationStats]],
    hessians: list[dict[str, Hessian]] | None,
    device: str,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every decoder projection as `Int4Groups`: AWQ-scaled (`scale_checkpoint`), each
    group's range clipped where AWQ's search chose to, rounded to nearest or, given
    `hessians`, by GPTQ against the Hessian of the scaled inputs."""
    scaled, scales = scale_checkpoint(
        ck.tensors, ck.config.num_layers, stats, search_scales, device
    )
    t: dict[str, torch.Tensor | QuantizedWeight] = dict(scaled)
    for i in range(ck.config.num_layers):
        names = layer_tensors(i)
        for projection in PROJECTIONS:
            s = scales[i].get(projection, torch.ones(1, device=device))
            x = stats[i][projection].sample.to(device) / s
            for name in names[projection]:
                w = scaled[name].to(device)
                ratios = search_clip(w, x)
                if hessians is None:
                    t[name] = quantize_int4(w, ratios=ratios)
                else:
                    t[name] = gptq_int4(w, hessians[i][projection].scaled(s), ratios=ratios)
    return t


def fp8_tensors(
    ck: LoadedCheckpoint, hessians: list[dict[str, Hessian]] | None
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The checkpoint with every decoder projection as `Fp8Channels`: rounded by GPTQ
    against its input Hessian when `hessians` are given (rows of a merged projection are
    independent in GPTQ, so each checkpoint tensor is rounded on its own with the shared
    Hessian), else to nearest."""
    t: dict[str, torch.Tensor | QuantizedWeight] = dict(ck.tensors)
    for i in range(ck.config.num_layers):
        names = layer_tensors(i)
        for projection in PROJECTIONS:
            for name in names[projection]:
                w = ck.tensors[name].float()
                if hessians is None:
                    t[name] = Fp8Channels(*quantize_fp8_per_channel(w))
                else:
                    t[name] = gptq_fp8(w, hessians[i][projection].matrix)
    return t


class _Fp8Input(_StandIn):
    """A dense projection whose input is rounded as the `fp8` format rounds it (`fp8-a`)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_fp8_torch(x)
        return self.linear((q.float() * scale).to(x.dtype))


def fp8_inputs(model: LlamaModel) -> LlamaModel:
    model.native_layers = False  # the stand-ins must see every projection's call
    for layer in model.layers:
        for name in PROJECTIONS:
            setattr(layer, name, _Fp8Input(getattr(layer, name)))
    return model


def prompts_from(text: str, ck: LoadedCheckpoint, count: int, length: int) -> list[list[int]]:
    """`count` prompts: the first `length` tokens after evenly spaced sentence starts."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 12]
    step = max(1, len(sentences) // count)
    picked = sentences[::step][:count]
    return [ck.tokenizer.encode(s)[:length] for s in picked]


ROWS = ["bf16", "fp8", "fp8-w", "fp8-a", "fp8-gptq", "fp8-smooth", "int4-rtn", "int4-awq",
        "int4-awq-gptq", "kv-fp8"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--only", default=",".join(ROWS), help="rows to measure (bf16 always)")
    ap.add_argument("--prompts", type=int, default=32, help="0: no greedy agreement")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=None, help="held-out tokens read (all)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ck = load_checkpoint()
    held = ck.tokenizer.encode((DATA / HELD_OUT).read_text())[: args.tokens]
    runner = Runner(ck.config, 1, WINDOW, args.device)
    rows = ["bf16"] + [r for r in args.only.split(",") if r in ROWS and r != "bf16"]
    print(f"{ck.model_id}: held-out {HELD_OUT} {len(held)} tokens; device {args.device}, "
          f"{args.backend}")  # fmt: skip

    hessians = stats = None
    if {"fp8-gptq", "int4-awq-gptq"} & set(rows):
        hessians = calibrate(ck, args, Hessian, list(PROJECTIONS))
    if {"fp8-smooth", "int4-awq", "int4-awq-gptq"} & set(rows):
        stats = calibrate(ck, args, lambda k: ActivationStats(k, SAMPLE_ROWS), list(PROJECTIONS))
    dev = args.device

    def model(row: str) -> LlamaModel:
        if row == "bf16":
            return build(ck, ck.tensors, "dense", args)
        if row in ("fp8", "int4-rtn"):
            return build(ck, ck.tensors, row.split("-")[0], args)
        if row == "fp8-w":
            fp8 = fp8_tensors(ck, None).items()
            weights = {n: w.dequantize() if isinstance(w, Fp8Channels) else w for n, w in fp8}
            return build(ck, weights, "dense", args)
        if row == "fp8-a":
            return fp8_inputs(build(ck, ck.tensors, "dense", args))
        if row == "kv-fp8":
            return build(ck, ck.tensors, "dense", args, calibrate_kv_scales(ck))
        if row == "fp8-gptq":
            return build(ck, fp8_tensors(ck, hessians), "fp8", args)
        assert stats is not None
        if row == "fp8-smooth":
            return build(ck, smooth_tensors(ck, stats, dev), "fp8", args)
        gptq_h = hessians if row == "int4-awq-gptq" else None
        return build(ck, awq_tensors(ck, stats, gptq_h, dev), "int4", args)

    nll: dict[str, torch.Tensor] = {}
    models = {}
    fp8_kv = Runner(ck.config, 1, WINDOW, args.device, torch.float8_e4m3fn)
    for row in rows:
        models[row] = model(row)
        nll[row] = window_nll(models[row], fp8_kv if row == "kv-fp8" else runner, held)
        ppl, ref = perplexity(nll[row]), perplexity(nll["bf16"])
        se = paired_se(nll[row], nll["bf16"])
        vs = "" if row == "bf16" else f"  ({ppl / ref - 1:+.2%} vs bf16, se {se:.2%})"
        print(f"  perplexity {row:<13} {ppl:8.3f}{vs}  ({time.time() - t0:.0f} s)", flush=True)
        if row not in ("bf16", "fp8-smooth", "int4-awq-gptq"):
            del models[row]  # keep only what the pipeline below needs

    if args.prompts and {"fp8-smooth", "int4-awq-gptq"} <= set(models):
        text = (DATA / HELD_OUT).read_text()
        prompts = prompts_from(text, ck, args.prompts, 24)
        runner = Runner(ck.config, len(prompts), 24 + args.new_tokens, args.device)
        ref_tokens = greedy(models["bf16"], models["bf16"], runner, prompts, args.new_tokens)
        pipe = greedy(
            models["fp8-smooth"], models["int4-awq-gptq"], runner, prompts, args.new_tokens
        )
        same = [next((i for i, (a, b) in enumerate(zip(r, q, strict=True)) if a != b), len(r))
                for r, q in zip(ref_tokens, pipe, strict=True)]  # fmt: skip
        exact = sum(s == args.new_tokens for s in same)
        agree = sum(same) / (len(same) * args.new_tokens)
        print(f"  greedy fp8-smooth prefill + int4-awq-gptq decode vs bf16 ({len(prompts)} "
              f"prompts x {args.new_tokens} tokens): {exact}/{len(prompts)} identical, "
              f"{agree:.1%} of tokens before the first divergence")  # fmt: skip
    print(f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
