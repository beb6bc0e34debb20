"""Engine throughput on CPU: Baton against Hugging Face transformers on the same model.

    python -m bench.engine_cpu [--threads 1] [--repeats 3] [--baton-linear dense int4]

Prints prefill tokens/s (one 512-token prompt) and decode tokens/s at batch 1 and 8
(greedy, 64 new tokens, EOS ignored) for each Baton weight format and for transformers
(bf16 and fp32, GGUF dequantized), medians over repeats, and Baton's ratio to
transformers bf16. Both run in this process with the same thread count, one after
another, so they share the machine's noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import default_model_path, load_checkpoint
from engine.sampling_params import SamplingParams

PROMPT_LEN = 512
NEW_TOKENS = 64
BATCHES = (1, 8)


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
