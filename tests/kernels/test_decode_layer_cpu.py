"""The native decode layer (kernels/decode_layer_cpu.py) is the op-by-op layer, bit for bit."""

from __future__ import annotations

import pytest
import torch

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.sampling_params import SamplingParams
from kernels import native
from kernels.decode_layer_cpu import NativeDecodeLayers
from tests.unit.tiny_model import tiny_checkpoint

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"native CPU kernels: {native.unavailable_reason()}"
)

PROMPTS = [list(range(100, 100 + n)) for n in (5, 17, 33)]  # 1-3 KV blocks each


def run(checkpoint: LoadedCheckpoint, native_decode: bool) -> tuple[list, list, torch.Tensor]:
    """Every forward's output, the tokens, and the KV cache after a greedy batch."""
    engine: LLMEngine = EngineArgs(linear="int4", max_model_len=128).create_engine(checkpoint)
    model = engine.model
    model.native_decode = native_decode
    hidden: list[torch.Tensor] = []
    forward = model.forward

    def recording(*args: object) -> torch.Tensor:
        out = forward(*args)  # type: ignore[arg-type]
        hidden.append(out.clone())
        return out

    model.forward = recording  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)
    return hidden, [o.token_ids for o in outputs], engine.runner.kv_cache.clone()


def test_native_decode_layers_match_the_op_by_op_layers_bit_for_bit(
    default_checkpoint: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = tiny_checkpoint(default_checkpoint)
    built: list[bool] = []
    build = NativeDecodeLayers.build

    def counting(model: object, kv_cache: torch.Tensor) -> NativeDecodeLayers | None:
        layers = build(model, kv_cache)
        built.append(layers is not None)
        return layers

    monkeypatch.setattr(NativeDecodeLayers, "build", counting)
    fused = run(tiny, native_decode=True)
    monkeypatch.undo()
    assert built == [True], "the tiny INT4 model should take the native decode path"
    plain = run(tiny, native_decode=False)
    assert fused[1] == plain[1]
    assert len(fused[0]) == len(plain[0]) > 10  # prefill steps, then decode steps
    for step, (a, b) in enumerate(zip(fused[0], plain[0], strict=True)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"step {step} differs"
    assert torch.equal(fused[2].view(torch.int16), plain[2].view(torch.int16))


def test_models_the_native_layer_cannot_run_stay_op_by_op(
    default_checkpoint: LoadedCheckpoint,
) -> None:
    tiny = tiny_checkpoint(default_checkpoint)
    for args in (EngineArgs(linear="dense"), EngineArgs(linear="int4", batch_invariant=True)):
        engine = args.create_engine(tiny)
        assert NativeDecodeLayers.build(engine.model, engine.runner.kv_cache) is None
