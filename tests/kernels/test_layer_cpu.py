"""The native layer (kernels/layer_cpu.py) is the op-by-op layer, bit for bit, over a bf16
or an FP8 KV cache."""

from __future__ import annotations

import pytest
import torch

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.sampling_params import SamplingParams
from kernels import native
from kernels.layer_cpu import NativeLayers
from tests.unit.tiny_model import tiny_checkpoint

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"native CPU kernels: {native.unavailable_reason()}"
)

PROMPTS = [list(range(100, 100 + n)) for n in (5, 17, 33)]  # 1-3 KV blocks each
# Then, with those cached: the longest prompt extended (a prefill after two cached blocks)
# beside a new one.
FOLLOW_UPS = [PROMPTS[2] + [7, 8, 9], list(range(300, 321))]


def run(
    checkpoint: LoadedCheckpoint, native_layers: bool, kv_cache_dtype: str
) -> tuple[list, list, torch.Tensor]:
    """Every forward's output, the tokens, and the KV cache's bytes after a greedy batch."""
    # 16-token steps: prompts are prefilled in chunks, in the same steps as others decode.
    args = EngineArgs(
        linear="int4", max_model_len=128, max_num_batched_tokens=16, kv_cache_dtype=kv_cache_dtype
    )
    engine: LLMEngine = args.create_engine(checkpoint)
    model = engine.model
    model.native_layers = native_layers
    hidden: list[torch.Tensor] = []
    forward = model.forward

    def recording(*args: object) -> torch.Tensor:
        out = forward(*args)  # type: ignore[arg-type]
        hidden.append(out.clone())
        return out

    model.forward = recording  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params) + engine.generate(FOLLOW_UPS, params)
    assert engine.stats.cached_prompt_tokens >= 32
    return hidden, [o.token_ids for o in outputs], engine.runner.kv_blocks.clone()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_native_layers_match_the_op_by_op_layers_bit_for_bit(
    default_checkpoint: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch, kv_cache_dtype: str
) -> None:
    tiny = tiny_checkpoint(default_checkpoint)
    built: list[bool] = []
    build = NativeLayers.build

    def counting(model: object, kv_cache: torch.Tensor) -> NativeLayers | None:
        layers = build(model, kv_cache)
        built.append(layers is not None)
        return layers

    monkeypatch.setattr(NativeLayers, "build", counting)
    fused = run(tiny, native_layers=True, kv_cache_dtype=kv_cache_dtype)
    monkeypatch.undo()
    assert built == [True], "the tiny INT4 model should take the native path"
    plain = run(tiny, native_layers=False, kv_cache_dtype=kv_cache_dtype)
    assert fused[1] == plain[1]
    assert len(fused[0]) == len(plain[0]) > 20  # prefill chunks, mixed steps, decodes
    for step, (a, b) in enumerate(zip(fused[0], plain[0], strict=True)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"step {step} differs"
    assert torch.equal(fused[2].view(torch.uint8), plain[2].view(torch.uint8))


def test_models_the_native_layer_cannot_run_stay_op_by_op(
    default_checkpoint: LoadedCheckpoint,
) -> None:
    tiny = tiny_checkpoint(default_checkpoint)
    for args in (EngineArgs(linear="dense"), EngineArgs(linear="int4", batch_invariant=True)):
        engine = args.create_engine(tiny)
        assert NativeLayers.build(engine.model, engine.runner.kv_cache) is None
