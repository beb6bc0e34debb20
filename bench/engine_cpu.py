"""Engine throughput on CPU: Baton against Hugging Face transformers on the same model.

    python -m bench.engine_cpu [--threads 1] [--repeats 3] [--baton-linear dense int4]
    python -m bench.engine_cpu --kv-cache [--threads 1] [--repeats 3] [--baton-linear ...]

Prints prefill tokens/s (one 512-token prompt) and decode tokens/s at batch 1 and 8
(greedy, 64 new tokens, EOS ignored) for each Baton weight format and for transformers
(bf16 and fp32, GGUF dequantized), medians over repeats, and Baton's ratio to
transformers bf16. Both run in this process with the same thread count, one after
another, so they share the machine's noise.

With --kv-cache, instead: decode ms a step at batch 1 and 8 after 512-token prompts, for
each weight format with the bf16 KV cache, the FP8 one, and the FP8 one as it ran before
its native CPU kernels (the torch reference ops, op by op), rounds alternating between
the three; the median step of each run, the median over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from unittest import mock

import torch

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import default_model_path, load_checkpoint
from engine.sampling_params import SamplingParams
from kernels.kv_cache_fp8 import paged_attention_fp8_torch, write_kv_fp8_torch
from kernels.torch_backend import TorchBackend

PROMPT_LEN = 512
NEW_TOKENS = 64
BATCHES = (1, 8)
KV_NEW_TOKENS = 24


def prompts(batch: int, length: int) -> list[list[int]]:
    # Distinct prompts (no shared prefix) of real token ids.
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1000, 40000, (length,), generator=g).tolist() for _ in range(batch)]


def median_of(repeats: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeats))


def baton_prefill(engine: LLMEngine) -> float:
    engine.pool.reset_prefix_cache()
    t = time.perf_counter()
    engine.generate(prompts(1, PROMPT_LEN), SamplingParams(max_tokens=1, temperature=0))
    return PROMPT_LEN / (time.perf_counter() - t)


def baton_decode(engine: LLMEngine, batch: int) -> float:
    engine.pool.reset_prefix_cache()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for p in prompts(batch, 32):
        engine.add_request(p, params)
    before = engine.stats.generated_tokens
    while engine.stats.generated_tokens - before < batch:
        engine.step()  # prefill every prompt and sample its first token
    start_tokens = engine.stats.generated_tokens
    t = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return (engine.stats.generated_tokens - start_tokens) / (time.perf_counter() - t)


def baton_decode_step_ms(engine: LLMEngine, batch: int) -> float:
    """The median ms of the decode steps of `batch` sequences after PROMPT_LEN-token prompts."""
    engine.pool.reset_prefix_cache()
    params = SamplingParams(max_tokens=KV_NEW_TOKENS, temperature=0, ignore_eos=True)
    for p in prompts(batch, PROMPT_LEN):
        engine.add_request(p, params)
    before = engine.stats.generated_tokens
    while engine.stats.generated_tokens - before < batch:
        engine.step()  # prefill every prompt and sample its first token
    steps = []
    while engine.has_unfinished:
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    return 1e3 * statistics.median(steps)


@contextlib.contextmanager
def fp8_kv_torch_path(engine: LLMEngine) -> Iterator[None]:
    """The FP8 KV cache as it ran before its native CPU kernels: the torch reference ops,
    layer by layer (no one-call native layer)."""
    engine.model.native_layers = False
    try:
        with (
            mock.patch.object(TorchBackend, "write_kv_fp8", lambda _, *a: write_kv_fp8_torch(*a)),
            mock.patch.object(
                TorchBackend, "paged_attention_fp8", lambda _, *a: paged_attention_fp8_torch(*a)
            ),
        ):
            yield
    finally:
        engine.model.native_layers = True


def kv_cache_table(linears: list[str], repeats: int) -> None:
    checkpoint = load_checkpoint(None)
    for linear in linears:
        head = "int8" if linear == "int4" else "dense"
        bf16, fp8 = (
            EngineArgs(linear=linear, lm_head_linear=head, kv_cache_dtype=kv).create_engine(
                checkpoint
            )
            for kv in ("auto", "fp8")
        )
        runs: dict[str, tuple[LLMEngine, Callable[[], contextlib.AbstractContextManager[None]]]]
        runs = {
            "bf16 KV": (bf16, contextlib.nullcontext),
            "fp8 KV": (fp8, contextlib.nullcontext),
            "fp8 KV, torch path (before)": (fp8, partial(fp8_kv_torch_path, fp8)),
        }
        for engine in (bf16, fp8):
            baton_decode_step_ms(engine, 1)  # warm-up
        ms: dict[tuple[str, int], list[float]] = {(name, b): [] for name in runs for b in BATCHES}
        for batch in BATCHES:
            for _ in range(repeats):
                for name, (engine, path) in runs.items():
                    with path():
                        ms[name, batch].append(baton_decode_step_ms(engine, batch))
        print(
            f"\n{linear} weights, {head} head: decode ms a step after {PROMPT_LEN}-token "
            f"prompts (median of {repeats} alternating rounds); x = ratio to bf16 KV"
        )
        print(f"{'KV cache':32s}" + "".join(f"{f'decode b{b}':>20s}" for b in BATCHES))
        for name in runs:
            cells = []
            for b in BATCHES:
                value, peer = statistics.median(ms[name, b]), statistics.median(ms["bf16 KV", b])
                cells.append(f"{value:.1f} ({value / peer:.2f}x)")
            print(f"{name:32s}" + "".join(f"{c:>20s}" for c in cells), flush=True)


def hf_model(dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def hf_prefill(model: Any) -> float:
    ids = torch.tensor(prompts(1, PROMPT_LEN))
    t = time.perf_counter()
    model(ids)
    return PROMPT_LEN / (time.perf_counter() - t)


@torch.inference_mode()
def hf_decode(model: Any, batch: int) -> float:
    ids = torch.tensor(prompts(batch, 32))
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=2)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kwargs)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
    total = time.perf_counter() - t
    return batch * (NEW_TOKENS - 1) / (total - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baton-linear", nargs="+", default=["dense", "int4"])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--kv-cache", action="store_true", help="the KV cache dtypes' table instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.kv_cache:
        print(f"torch threads {args.threads}, {os.cpu_count()} cores, torch {torch.__version__}")
        kv_cache_table(args.baton_linear, args.repeats)
        return
    rows: dict[str, dict[str, float]] = {}
    checkpoint = load_checkpoint(None)
    for linear in args.baton_linear:
        # The LM head as the decode pool serves it on a CPU (services.serving_config).
        head = "int8" if linear == "int4" else "dense"
        engine = EngineArgs(linear=linear, lm_head_linear=head).create_engine(checkpoint)
        baton_decode(engine, 1)  # warm-up
        name = f"baton bf16 act, {linear} weights, {head} head"
        rows[name] = {"prefill": median_of(args.repeats, partial(baton_prefill, engine))}
        for b in BATCHES:
            rows[name][f"decode b{b}"] = median_of(args.repeats, partial(baton_decode, engine, b))
        del engine
    if not args.skip_hf:
        for dtype in (torch.bfloat16, torch.float32):
            model = hf_model(dtype)
            hf_decode(model, 1)  # warm-up
            name = f"transformers {str(dtype).removeprefix('torch.')}"
            rows[name] = {"prefill": median_of(args.repeats, partial(hf_prefill, model))}
            for b in BATCHES:
                rows[name][f"decode b{b}"] = median_of(args.repeats, partial(hf_decode, model, b))
            del model
    cols = ["prefill"] + [f"decode b{b}" for b in BATCHES]
    peer = rows.get("transformers bfloat16")
    print(
        f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {args.threads}, torch {torch.__version__}"
    )
    print(f"tokens/s (median of {args.repeats}); x = ratio to transformers bfloat16")
    print(f"{'engine':44s}" + "".join(f"{c:>20s}" for c in cols))
    for name, r in rows.items():
        cells = []
        for c in cols:
            ratio = f" ({r[c] / peer[c]:.2f}x)" if peer else ""
            cells.append(f"{r[c]:.1f}{ratio}")
        print(f"{name:44s}" + "".join(f"{x:>20s}" for x in cells))


if __name__ == "__main__":
    main()
