"""engine.quant.gptq: GPTQ rounding to FP8 and INT4, weights quantized ahead of time in the
model, and scaled checkpoints (engine.quant.scaling)."""

import dataclasses

import pytest
import torch

from bench.paged_runner import Runner
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.linear import Linear, cat_weights, linear_format
from engine.loaders.tensor_layout import expected_shapes
from engine.model import LlamaModel
from engine.quant.fp8 import Fp8Channels, quantize_fp8_per_channel
from engine.quant.gptq import Hessian, gptq, gptq_fp8, gptq_int4
from engine.quant.int4 import quantize_int4
from engine.quant.scaling import SCALED, scale_checkpoint
from kernels.backend import get_backend
from tests.kernels.bounds import FP8_ROUND, FP8_SUBNORMAL, assert_within


def _correlated_rows(rows: int, mix: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose channels move together (a few latent factors `mix` [factors, k]), as
    real activations do."""
    factors, k = mix.shape
    noise = 0.1 * torch.randn(rows, k, generator=gen)
    return torch.randn(rows, factors, generator=gen) @ mix + noise


def _calibrated_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight [64, 256], the Hessian of 1024 correlated calibration rows, and 512 unseen
    rows from the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    k, n = 256, 64
    mix = torch.randn(8, k, generator=gen)
    calib, held_out = _correlated_rows(1024, mix, gen), _correlated_rows(512, mix, gen)
    w = torch.randn(n, k, generator=gen)
    hessian = Hessian(k)
    hessian.observe(calib)
    return w, hessian.matrix, held_out


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x.double() @ (w.double() - q.double()).T).pow(2).mean())


def test_hessian_accumulates_over_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=gen)
    h = Hessian(6)
    h.observe(x[:4])
    h.observe(x[4:].reshape(2, 3, 6))  # any leading shape
    assert h.rows == 10
    assert torch.allclose(h.matrix, x.double().T @ x.double() / 10)
    with pytest.raises(ValueError, match="no rows"):
        _ = Hessian(6).matrix


def test_uncorrelated_inputs_leave_nothing_to_compensate():
    """With a diagonal Hessian no error moves to other columns: GPTQ is round-to-nearest,
    bit for bit, scales included."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 300, generator=gen)
    h = torch.diag(torch.rand(300, generator=gen, dtype=torch.float64) + 0.5)
    got = gptq_fp8(w, h)
    q, scale = quantize_fp8_per_channel(w)
    assert torch.equal(got.scale, scale)
    assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8))


def test_gptq_fp8_lowers_the_output_error_on_unseen_rows():
    w, hessian, held_out = _calibrated_problem(2)
    got = gptq_fp8(w, hessian)
    q, scale = quantize_fp8_per_channel(w)
    assert torch.equal(got.scale, scale)  # the format's own per-channel scales
    # Every value sits on the FP8 grid of its channel: the format serves it as it is.
    assert torch.equal(
        got.q.float().to(torch.float8_e4m3fn).view(torch.uint8), got.q.view(torch.uint8)
    )
    rtn = q.double() * scale.double()[:, None]
    err_gptq = _output_error(held_out, w, got.dequantize())
    err_rtn = _output_error(held_out, w, rtn)
    assert err_gptq < 0.1 * err_rtn, (err_gptq, err_rtn)  # measured: 0.017x
    # The weights themselves move further than rounding alone would (they compensate).
    assert (got.dequantize().double() - w.double()).abs().max() > (rtn - w.double()).abs().max()


def test_gptq_rounds_every_column_once_in_order():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 200, generator=gen)
    x = _correlated_rows(300, torch.randn(8, 200, generator=gen), gen).double()
    seen = []

    def to_integers(j: int, rest: torch.Tensor) -> torch.Tensor:
        assert j == len(seen) and rest.shape == (5, 128 - j % 128 if j < 128 else 200 - j)
        seen.append(rest[:, 0].clone())
        return rest[:, 0].round()

    out = gptq(w, x.T @ x / 300, to_integers)
    assert len(seen) == 200 and torch.equal(out, out.round())
    assert torch.equal(seen[0], w[:, 0].double())  # the first column is untouched by feedback
    assert not torch.equal(seen[-1], w[:, -1].double())  # the last absorbed the others' errors


def test_gptq_rejects_bad_hessians():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="does not match"):
        gptq_fp8(w, torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_fp8(w, -torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        gptq_fp8(torch.randn(8), torch.eye(8, dtype=torch.float64))


def test_fp8_channels_are_served_as_they_are():
    ops = get_backend("torch")
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=gen)
    parts = [
        Fp8Channels(*quantize_fp8_per_channel(w[:16])),
        Fp8Channels(*quantize_fp8_per_channel(w[16:])),
    ]
    merged = cat_weights(parts)
    assert isinstance(merged, Fp8Channels) and merged.shape == (48, 128)
    linear = Linear(merged, None, linear_format("fp8"), ops, torch.bfloat16, "cpu")
    assert torch.equal(linear.stored.data.view(torch.uint8), merged.q.view(torch.uint8))
    x = torch.randn(3, 128, generator=gen).to(torch.bfloat16)
    ref = x.double() @ merged.dequantize().double().T
    # Per-token FP8 rounding of x, then the bf16 output.
    bound = (FP8_ROUND + FP8_SUBNORMAL) * x.double().abs() @ merged.dequantize().double().abs().T
    assert_within(linear(x).double(), ref, bound + 2**-8 * ref.abs(), "fp8 linear of Fp8Channels")


def test_quantized_weights_only_go_to_their_format():
    ops = get_backend("torch")
    q = Fp8Channels(*quantize_fp8_per_channel(torch.randn(16, 64)))
    for name in ("dense", "int4", "int8"):
        with pytest.raises(ValueError, match="quantized as fp8 ahead of time"):
            Linear(q, None, linear_format(name), ops, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="quantize all alike"):
        cat_weights([q, torch.randn(16, 64)])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Channels(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="one scale per output channel"):
        Fp8Channels(q.q, torch.ones(3))


def _tiny_config(linear: str) -> EngineConfig:
    model = ModelConfig(
        architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, eos_token_ids=(0,),
    )  # fmt: skip
    return EngineConfig(
        model=model, cache=CacheConfig(num_blocks=4), scheduler=SchedulerConfig(max_model_len=64),
        dtype="bfloat16", linear=linear, kernel_backend="torch", device="cpu",
    )  # fmt: skip


def test_model_builds_merged_projections_from_quantized_weights():
    config = _tiny_config("fp8")
    gen = torch.Generator().manual_seed(5)
    tensors: dict = {
        n: torch.randn(s, generator=gen) * 0.2 for n, s in expected_shapes(config.model).items()
    }
    for name in list(tensors):
        if name.endswith("_proj.weight"):
            tensors[name] = Fp8Channels(*quantize_fp8_per_channel(tensors[name]))
    model = LlamaModel(config, tensors)
    qkv = model.layers[1].qkv_proj.stored
    parts = [tensors[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]
    assert torch.equal(
        qkv.data.view(torch.uint8), torch.cat([p.q for p in parts]).view(torch.uint8)
    )
    with pytest.raises(ValueError, match="quantized as fp8 ahead of time"):
        LlamaModel(_tiny_config("dense"), tensors)


def test_gptq_int4_lowers_the_output_error_on_unseen_rows():
    w, hessian, held_out = _calibrated_problem(6)
    n = w.shape[0]
    got = gptq_int4(w, hessian)
    assert got.group_size == 128 and got.scales.shape == (n, 2)
    assert got.q.dtype == torch.uint8 and int(got.q.max()) <= 15
    z = got.zeros.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
    err_gptq = _output_error(held_out, w, got.dequantize())
    err_rtn = _output_error(held_out, w, quantize_int4(w).dequantize())
    assert err_gptq < 0.1 * err_rtn, (err_gptq, err_rtn)
    # Clip ratios shrink each group's range (here all groups to half: smaller steps).
    half = gptq_int4(w, hessian, ratios=torch.full((n, 2), 0.5))
    assert float(half.scales.float().mean()) < 0.6 * float(got.scales.float().mean())


def test_hessian_of_scaled_inputs():
    gen = torch.Generator().manual_seed(7)
    x, s = torch.randn(50, 6, generator=gen), torch.rand(6, generator=gen) + 0.5
    h = Hessian(6)
    h.observe(x)
    expected = (x / s).double().T @ (x / s).double() / 50
    assert torch.allclose(h.scaled(s), expected)


def test_scaling_a_checkpoint_keeps_its_function():
    """s folded upstream (norms, up_proj rows): the same logits in full precision."""
    config = dataclasses.replace(_tiny_config("dense"), dtype="float32")
    gen = torch.Generator().manual_seed(8)
    tensors = {
        n: torch.randn(s, generator=gen) * 0.2 for n, s in expected_shapes(config.model).items()
    }
    layers = config.model.num_layers
    scales = {}

    def search(weights: list[torch.Tensor], key: str) -> torch.Tensor:
        scales[key] = torch.rand(weights[0].shape[1], generator=gen) * 4 + 0.25
        return scales[key]

    stats = [{p: f"{i}.{p}" for p in SCALED} for i in range(layers)]
    scaled, chosen = scale_checkpoint(tensors, layers, stats, search)
    assert chosen[1]["qkv_proj"] is scales["1.qkv_proj"]
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(scaled[q], tensors[q] * scales["1.qkv_proj"])
    runner = Runner(config.model, 1, 64, "cpu", torch.float32)
    ids = torch.randint(0, 96, (20,), generator=gen).tolist()
    before, after = (
        LlamaModel(config, t).logits(runner.step(LlamaModel(config, t), [(0, ids, 0)], 0))
        for t in (tensors, scaled)
    )
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (after - before).abs().max()
