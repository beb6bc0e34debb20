"""The FP8 KV cache as an engine option (`kv_cache_dtype`): an fp8_e4m3 paged cache with one
fp32 scale per (layer, K|V, head), calibrated at load from the checkpoint alone, whose
blocks carry their scales from engine to engine and are refused under other scales."""

from __future__ import annotations

import dataclasses

import pytest
import tokenizers
import torch
from pydantic import ValidationError

from engine.config import CacheConfig, EngineConfig
from engine.disaggregated import InProcessDisaggregation
from engine.engine_args import EngineArgs
from engine.kv_scales import HEADROOM, calibrate_kv_scales, kv_amax
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.quant import CALIBRATION_TEXT
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from kernels.fp8_linear import FP8_MAX
from services.serving_config import ServingConfig
from tests.unit.conftest import MakeEngine, assert_idle
from tests.unit.tiny_model import tiny_checkpoint

GREEDY = SamplingParams(max_tokens=8, min_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(default_checkpoint: LoadedCheckpoint) -> LoadedCheckpoint:
    return tiny_checkpoint(default_checkpoint)


def _tiny_engine(make_engine: MakeEngine, tiny: LoadedCheckpoint, **kwargs: object) -> LLMEngine:
    kwargs.setdefault("kv_cache_dtype", "fp8")
    return make_engine(tiny, max_model_len=256, kv_cache_bytes=2**20, **kwargs)


def _text_prompt(engine: LLMEngine, length: int) -> list[int]:
    held_out = (CALIBRATION_TEXT.parent / "alice29.txt").read_text()
    return engine.tokenizer.encode(held_out[5000:9000])[:length]


# -- the option -------------------------------------------------------------------------


def test_a_bad_kv_cache_dtype_is_refused_naming_the_field(tiny: LoadedCheckpoint) -> None:
    want = "kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', got 'int8'"
    with pytest.raises(ValueError, match=want):
        EngineArgs(kv_cache_dtype="int8").engine_config(tiny)
    with pytest.raises(ValueError, match=want):
        EngineConfig(model=tiny.config, cache=CacheConfig(4), kv_cache_dtype="int8")
    with pytest.raises(ValidationError, match=r"decode\.kv_cache_dtype"):
        ServingConfig.model_validate({"decode": {"kv_cache_dtype": "int8"}})
    # Decode reads what prefill writes: the pools must cache KV alike.
    with pytest.raises(ValidationError, match=r"prefill\.kv_cache_dtype \(fp8_e4m3\) and "):
        ServingConfig.model_validate({"prefill": {"kv_cache_dtype": "fp8"}})
    both = {"kv_cache_dtype": "fp8_e4m3"}
    config = ServingConfig.model_validate({"prefill": {"kv_cache_dtype": "fp8"}, "decode": both})
    assert config.engine_args(config.decode).kv_cache_dtype == "fp8_e4m3"
    assert config.engine_args(config.prefill).kv_cache_dtype == "fp8"


def test_the_fp8_cache_is_float8_at_half_the_bytes_of_bf16(
    make_engine: MakeEngine, tiny: LoadedCheckpoint
) -> None:
    bf16 = _tiny_engine(make_engine, tiny, dtype="bfloat16", kv_cache_dtype="auto")
    fp8 = _tiny_engine(make_engine, tiny, dtype="bfloat16")
    cfg = tiny.config
    assert bf16.runner.kv_cache.dtype == torch.bfloat16
    assert fp8.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.runner.kv_cache.shape[1:] == bf16.runner.kv_cache.shape[1:]
    data = 2 * 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim  # bf16 bytes a block
    scales = 4 * cfg.num_layers * 2 * cfg.num_kv_heads
    assert bf16.block_format.nbytes == data
    assert fp8.block_format.data_nbytes == data // 2
    assert fp8.block_format.nbytes == data // 2 + scales
    # The same kv_cache_bytes hold about twice the blocks; each block's payload is a row.
    assert bf16.config.cache.num_blocks == 2**20 // data
    assert fp8.config.cache.num_blocks == 2**20 // (data // 2 + scales)
    assert fp8.port.block(3).shape == (data // 2 + scales,)
    # The fingerprint says fp8, so fp8 and bf16 blocks never share a name in the store.
    assert (bf16.fingerprint.kv_dtype, fp8.fingerprint.kv_dtype) == ("bf16", "fp8_e4m3")
    assert bf16.fingerprint.digest != fp8.fingerprint.digest
    spelled = _tiny_engine(make_engine, tiny, dtype="bfloat16", kv_cache_dtype="fp8_e4m3")
    assert spelled.fingerprint == fp8.fingerprint


# -- the scales -------------------------------------------------------------------------


def test_scales_depend_on_the_checkpoint_alone(
    make_engine: MakeEngine, tiny: LoadedCheckpoint, default_checkpoint: LoadedCheckpoint
) -> None:
    """A prefill pool (FP8 weights) and a decode pool (INT4 weights) of one checkpoint, in
    any activation dtype, derive the same power-of-two scales, and their blocks carry them."""
    prefill = _tiny_engine(make_engine, tiny, dtype="bfloat16", linear="fp8")
    decode = _tiny_engine(make_engine, tiny, dtype="bfloat16", linear="int4")
    exact = _tiny_engine(make_engine, tiny, dtype="float32")
    scales = calibrate_kv_scales(tiny)
    assert scales.shape == (tiny.config.num_layers, 2, tiny.config.num_kv_heads)
    for engine in (prefill, decode, exact):
        assert engine.model.kv_scales is not None
        assert torch.equal(engine.model.kv_scales, scales)
        payload = engine.port.block(5)
        tail = payload[engine.block_format.data_nbytes :].view(torch.float32).view(scales.shape)
        assert torch.equal(tail, scales)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    amax = kv_amax(tiny)
    assert bool((HEADROOM * amax <= FP8_MAX * scales).all())
    assert bool((HEADROOM * amax > FP8_MAX * scales / 2).all())
    other = tiny_checkpoint(default_checkpoint, seed=1)
    assert not torch.equal(calibrate_kv_scales(other), scales)


@pytest.mark.parametrize(
    ("split", "tokens", "distinct"),
    [(False, 1, 1), (True, 256, 1)],
    ids=["one-token", "every-word-unknown"],
)
def test_a_tokenizer_that_reads_the_calibration_text_as_a_few_ids_is_refused(
    tiny: LoadedCheckpoint, split: bool, tokens: int, distinct: int
) -> None:
    """A word-level tokenizer with no pre-tokenizer reads the whole prose as one token; with
    one, but a vocabulary of none of its words, as 256 unknown ids. Scales from one id's
    K/V say nothing about the cache's."""
    vocab = {f"t{i}": i for i in range(tiny.config.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    if split:
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    few_ids = Tokenizer(backend, bos_token_id=None, eos_token_ids=tiny.config.eos_token_ids)
    checkpoint = dataclasses.replace(tiny, tokenizer=few_ids)
    with pytest.raises(ValueError) as failure:
        calibrate_kv_scales(checkpoint)
    assert str(failure.value) == (
        "the FP8 KV cache calibrates its scales on calibration.txt, which this model's "
        f"tokenizer reads as {tokens} tokens, {distinct} of them distinct (at least 64 "
        "distinct needed); use kv_cache_dtype auto with this tokenizer"
    )


def test_the_default_models_scales_are_far_from_floating_point_noise(
    default_checkpoint: LoadedCheckpoint,
) -> None:
    """Two machines' calibrations differ by float32 noise (~1e-6 relative): a scale flips
    only if its amax lies that close to a power-of-two boundary. For SmolLM2 the closest of
    its 180 lies over 1e-4 away (asserted)."""
    ratio = torch.log2(kv_amax(default_checkpoint).double() * HEADROOM / FP8_MAX)
    closest = float((ratio - ratio.round()).abs().min())
    assert 2**closest - 1 > 1e-4


def test_held_out_text_and_code_are_cached_unclipped(
    make_engine: MakeEngine, default_checkpoint: LoadedCheckpoint
) -> None:
    """K/V of text unlike the calibration prose reach 1.83 times its largest (the first
    1024 tokens of the held-out text) and 1.47 times (Python code): HEADROOM leaves room
    for them under 448 * scale (both fill only 1/1.26 and 1/1.53 of it), where scales
    at amax / 448 would clip them."""
    engine = make_engine(kv_cache_dtype="auto")  # fp32 KV: the values an fp8 cache divides
    scales = calibrate_kv_scales(default_checkpoint)
    held_out = (CALIBRATION_TEXT.parent / "alice29.txt").read_text()
    code = "def parse(path):\n    import csv\n    with open(path) as f:\n"
    code += "        return sum(float(r[2]) for r in csv.reader(f))\n"
    for prompt in (engine.tokenizer.encode(held_out)[:1023], engine.tokenizer.encode(code * 8)):
        engine.runner.kv_cache.zero_()
        engine.generate([prompt], SamplingParams(max_tokens=1))
        amax = engine.runner.kv_cache.abs().amax(dim=(0, 3, 5))
        assert bool((amax <= FP8_MAX * scales).all())


# -- the model path ---------------------------------------------------------------------


def test_greedy_decoding_with_fp8_kv_agrees_with_bf16_kv(make_engine: MakeEngine) -> None:
    """Teacher-forced: at each step of the bf16 cache's greedy continuation, the fp8 cache's
    engine picks the same next token. fp8 rounding flips argmaxes only at near-ties, so 80%
    of these 48 steps leaves them room; KV read without its scales agrees on none (0% with
    the read side's scale multiply removed, in a review's mutation run)."""
    bf16 = make_engine(dtype="bfloat16", kv_cache_dtype="auto")
    fp8 = make_engine(dtype="bfloat16", kv_cache_dtype="fp8")
    held_out = (CALIBRATION_TEXT.parent / "alice29.txt").read_text()
    sentences = [s for s in held_out.replace("\n", " ").split(". ") if len(s.split()) > 12]
    prompts = [bf16.tokenizer.encode(s)[:24] for s in sentences[10:400:130]]
    steps = 16
    params = SamplingParams(max_tokens=steps, min_tokens=steps, temperature=0, ignore_eos=True)
    continuations = [c.token_ids for c in bf16.generate(prompts, params)]
    forced = [p + c[:j] for p, c in zip(prompts, continuations, strict=True) for j in range(steps)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    picked = [c.token_ids[0] for c in fp8.generate(forced, one)]
    wanted = [t for c in continuations for t in c]
    agree = sum(a == b for a, b in zip(picked, wanted, strict=True)) / len(wanted)
    assert agree >= 0.8, f"fp8 KV picked the bf16 KV's token at {agree:.0%} of the steps"


def test_a_prefix_cache_hit_reproduces_the_recompute(
    make_engine: MakeEngine, tiny: LoadedCheckpoint
) -> None:
    engine = _tiny_engine(make_engine, tiny)
    shared = _text_prompt(engine, 70)
    engine.generate([[*shared[:66], 11, 12, 13]], GREEDY)
    second = [*shared[:66], 21, 22, 23, 24]
    hit = engine.generate([second], GREEDY)[0]
    assert hit.num_cached_tokens == 64
    assert engine.pool.reset_prefix_cache()
    cold = engine.generate([second], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert hit.token_ids == cold.token_ids


# -- blocks between engines -------------------------------------------------------------


def _export(engine: LLMEngine, prompt: list[int]) -> tuple[list[bytes], torch.Tensor]:
    """A finished prefill's prompt blocks as the wire carries them: hashes and payloads."""
    engine.add_request(prompt, SamplingParams(max_tokens=1), "held", hold_prompt_blocks=True)
    while engine.has_unfinished:
        engine.step()
    held = engine.port.held("held")
    payloads = torch.empty((len(held), engine.block_format.nbytes), dtype=torch.uint8)
    engine.port.read_blocks([i for _, i in held], payloads)
    engine.port.release_held("held")
    return [h for h, _ in held], payloads


def test_an_imported_block_reproduces_the_recompute(
    make_engine: MakeEngine, tiny: LoadedCheckpoint
) -> None:
    src = _tiny_engine(make_engine, tiny)
    dst = make_engine(tiny, max_model_len=256, kv_cache_bytes=2**19, kv_cache_dtype="fp8")
    prompt = _text_prompt(src, 53)
    hashes, payloads = _export(src, prompt)
    assert len(hashes) == 3
    wire = torch.frombuffer(bytearray(payloads.numpy().tobytes()), dtype=torch.uint8)
    ids = dst.port.reserve(3)
    assert ids is not None
    dst.port.write_blocks(ids, wire.view(3, -1))
    dst.port.publish(ids, hashes)
    rid = dst.add_request(
        prompt, GREEDY, kv_fingerprint=src.fingerprint, pinned_blocks=ids, handed_over=True
    )
    imported = dst.collect([rid])[0]
    assert imported.num_cached_tokens == 48
    assert dst.stats.computed_tokens == 5 + 7  # the partial tail block, then decodes
    assert src.pool.reset_prefix_cache()
    recomputed = src.generate([prompt], GREEDY)[0]
    assert recomputed.num_cached_tokens == 0
    assert imported.token_ids == recomputed.token_ids


def test_blocks_move_from_an_fp8_prefill_pool_to_an_int4_decode_pool(
    make_engine: MakeEngine, tiny: LoadedCheckpoint
) -> None:
    prefill = _tiny_engine(make_engine, tiny, dtype="bfloat16", linear="fp8")
    decode = _tiny_engine(make_engine, tiny, dtype="bfloat16", linear="int4")
    split = InProcessDisaggregation(prefill, decode)
    prompt = _text_prompt(prefill, 40)
    out = split.generate([prompt], GREEDY)[0]
    assert len(out.token_ids) == 8
    assert decode.stats.cached_prompt_tokens == 32  # both blocks imported, none refused


def test_a_block_under_other_scales_is_refused(
    make_engine: MakeEngine, tiny: LoadedCheckpoint
) -> None:
    src = _tiny_engine(make_engine, tiny)
    dst = _tiny_engine(make_engine, tiny)
    hashes, payloads = _export(src, _text_prompt(src, 40))
    # As an engine that calibrated otherwise would have written it: one head's V scale.
    src.block_format.scales_view(payloads)[1, 1, 1, 0] *= 2
    ids = dst.port.reserve(2)
    assert ids is not None
    dst.port.write_blocks(ids, payloads)
    refused = r"carries FP8 scales that differ from this engine's in 1 of 8 \(layer, K\|V, head\)"
    with pytest.raises(ValueError, match=refused):
        dst.port.publish(ids, hashes)
    assert dst.port.cached_prefix(hashes) == 0  # neither block named, the good one neither
    dst.port.release(ids)
    own = dst.block_format.scales_view(dst.runner.kv_blocks)[ids]
    assert dst.model.kv_scales is not None
    assert torch.equal(own, dst.model.kv_scales.expand_as(own))  # reused with this engine's
    assert_idle(dst)


def test_in_process_pools_must_cache_alike_and_a_refused_transfer_keeps_nothing(
    make_engine: MakeEngine, tiny: LoadedCheckpoint, default_checkpoint: LoadedCheckpoint
) -> None:
    """A bf16 engine beside an fp8 one was "different KV block shapes"; a decode engine
    that refused the transferred blocks (other scales) kept their pins."""
    fp8 = _tiny_engine(make_engine, tiny)
    with pytest.raises(ValueError, match=r"cache KV blocks differently: .*'fp32'.*'fp8_e4m3'"):
        InProcessDisaggregation(_tiny_engine(make_engine, tiny, kv_cache_dtype="auto"), fp8)
    other = _tiny_engine(make_engine, tiny_checkpoint(default_checkpoint, seed=1))
    split = InProcessDisaggregation(other, fp8)  # alike in shape, not in scales
    (handoff,) = split.prefill([_text_prompt(other, 40)], [GREEDY])
    with pytest.raises(ValueError, match="carries FP8 scales that differ"):
        split.transfer(handoff)
    assert fp8.pool.num_free_blocks == fp8.pool.num_blocks
    other.port.release_held(handoff.request_id)
