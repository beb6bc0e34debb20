"""RMSNorm split between INT4 GEMMs (`kernels.pending_norm`): the producer adds the residual
and leaves the norm pending, the consumer finishes it in its epilogue; no norm kernel runs
between them. The same model with the split turned off is the reference."""

import pytest
import torch

from bench.paged_runner import Runner
from engine.linear import Linear, linear_format
from engine.quant.int4 import quantize_int4
from kernels.backend import get_backend
from kernels.pending_norm import PendingNorm
from kernels.triton_backend import TritonBackend
from tests.kernels.bounds import ROUND, assert_within
from tests.kernels.test_gpu_pipeline import _model, _rel, _shapes, _weights


def test_linear_add_norm_leaves_the_norm_pending_for_the_next_projection(device):
    k, n = (256, 128) if device.type == "cpu" else (4096, 4096)
    ops = get_backend("triton")

    def linear(w, invariant=False):
        return Linear(w, None, linear_format("int4"), ops, torch.bfloat16, str(device), invariant)

    consumer_weight = quantize_int4(torch.randn(64, n, device=device) / n**0.5)
    producer = linear(torch.randn(n, k, device=device) / k**0.5)
    consumer = linear(consumer_weight)
    assert producer.adds_norm and consumer.takes_pending
    x = torch.randn(3, k, device=device).to(torch.bfloat16)
    residual = torch.randn(3, n, device=device).to(torch.bfloat16)
    gamma = (1 + 0.1 * torch.randn(n, device=device)).to(torch.bfloat16)
    pending, s = producer.add_norm(x, residual, gamma, 1e-5)
    assert isinstance(pending, PendingNorm)
    normed, s_ref = ops.rms_norm(producer(x), gamma, 1e-5, residual)  # the two-kernel path
    assert torch.equal(s, s_ref)
    assert_within(pending.materialize(), normed.double(), 3 * ROUND * normed.double().abs(), "h")
    ref = consumer(normed).double()
    # |W| |h| over the weight the consumer multiplies by: each h element differs by a few
    # roundings between the split and the two-kernel path
    scale = normed.double().abs() @ consumer_weight.dequantize().double().abs().T + ref.abs()
    assert_within(consumer(pending), ref, 4 * ROUND * scale, "consumer")
    # A batch-invariant projection materializes the rows first, then multiplies them alone.
    invariant = linear(consumer_weight, invariant=True)
    assert not invariant.takes_pending
    assert torch.equal(invariant(pending), invariant(pending.materialize()))


@pytest.fixture
def count_norms(monkeypatch):
    calls = []
    original = TritonBackend.rms_norm

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TritonBackend, "rms_norm", counting)
    return calls


def test_int4_model_runs_two_norm_kernels_and_matches_the_unsplit_model(
    device, monkeypatch, count_norms
):
    cfg, lengths, _ = _shapes(device)
    tensors = _weights(cfg, device)
    split = _model(cfg, tensors, "int4", "triton", device, "bfloat16")
    monkeypatch.setattr(TritonBackend, "fused_int4_norm", False)
    whole = _model(cfg, tensors, "int4", "triton", device, "bfloat16")
    assert split.layers[0].o_proj.adds_norm and not whole.layers[0].o_proj.adds_norm
    prompts = [torch.randint(1, cfg.vocab_size, (n,)).tolist() for n in lengths]
    chunks = [(b, p, 0) for b, p in enumerate(prompts)]
    logits = {}
    for name, model in (("split", split), ("whole", whole)):
        runner = Runner(cfg, len(lengths), max(lengths) + 1, device, torch.bfloat16)
        count_norms.clear()
        logits[name] = model.logits(runner.step(model, chunks, 0)).float()
        logits[name + " norms"] = len(count_norms)
    # the first layer's input norm and the final norm; every other one is split
    assert logits["split norms"] == 2 and logits["whole norms"] == 2 * cfg.num_layers + 1
    # each split norm rounds gamma * s once where the kernel rounds s * rstd and the
    # product: bf16-level differences, propagated through the layers
    assert _rel(logits["split"], logits["whole"]) < 2e-2
