"""Bad input gets a clear error naming the problem and leaves no state behind."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.unit.conftest import MakeEngine, assert_idle


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.5}, r"temperature must be in \[0, 2\]"),
        ({"temperature": 3.0}, r"temperature must be in \[0, 2\]"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k must be an integer in \[0, 2147483647\]"),
        ({"top_k": 2**63}, r"top_k must be an integer in \[0, 2147483647\]"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\)"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop takes at most 16"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids must be non-negative"),
        ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be an integer in \[0, max_tokens"),
        # Right type or refused: never a TypeError, nor a value that crashes a later step.
        ({"max_tokens": 2.0}, "max_tokens must be an integer >= 1, got 2.0"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1, got True"),
        ({"min_tokens": 1.0}, "min_tokens must be an integer in"),
        ({"temperature": "0.5"}, r"temperature must be in \[0, 2\], got '0.5'"),
        ({"temperature": float("nan")}, r"temperature must be in \[0, 2\], got nan"),
        ({"temperature": True}, r"temperature must be in \[0, 2\], got True"),
        ({"top_p": None}, r"top_p must be in \(0, 1\], got None"),
        ({"top_k": True}, "top_k must be an integer in"),
        ({"seed": 1.5}, "seed must be an integer in .* got 1.5"),
        ({"seed": False}, "seed must be an integer in .* got False"),
        ({"stop": 5}, "stop must be a string or a list of strings, got int"),
        ({"stop": (b"x",)}, "stop strings must be non-empty strings"),
        ({"stop_token_ids": 7}, "stop_token_ids must be a list of integers, got int"),
        ({"stop_token_ids": (1.5,)}, r"stop_token_ids must be non-negative integers, got \(1.5,\)"),
        ({"stop_token_ids": (True,)}, "stop_token_ids must be non-negative integers"),
        ({"ignore_eos": "yes"}, "ignore_eos must be a boolean, got 'yes'"),
        ({"logprobs": 2.5}, "logprobs must be an integer in .* got 2.5"),
        ({"logprobs": True}, "logprobs must be an integer in .* got True"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_window(make_engine: MakeEngine) -> None:
    engine = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match=r"context window is 64 tokens.*70 \(60 in the prompt"):
        engine.add_request(list(range(100, 160)), SamplingParams(max_tokens=10))
    assert_idle(engine)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "prompt is empty"),
        ("", "prompt is empty"),
        ([5, 49152], r"token id 49152 is outside the vocabulary \[0, 49152\)"),
        ([-1], "token id -1 is outside the vocabulary"),
    ],
)
def test_bad_prompts(make_engine: MakeEngine, prompt: list[int] | str, message: str) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams())
    assert_idle(engine)


def test_stop_token_ids_outside_the_vocabulary(make_engine: MakeEngine) -> None:
    """Checked at admission: a step suppressing them (before min_tokens) would index the
    logits out of range and take the engine down with every request on it."""
    engine = make_engine()
    params = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(49152,))
    with pytest.raises(ValueError, match=r"stop_token_ids token id 49152 is outside"):
        engine.add_request([1, 2, 3], params)
    assert_idle(engine)


def test_a_refused_request_releases_the_blocks_pinned_for_it(make_engine: MakeEngine) -> None:
    """Imported KV is pinned before the request is added; a refusal must not strand it."""
    engine = make_engine()
    blocks = engine.port.reserve(3)
    assert blocks is not None
    engine.port.publish(blocks, [bytes([i]) * 32 for i in range(3)])
    for prompt, request_id in (([5, 49152], None), ([1, 2], "y")):
        if request_id == "y":
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="y")
            blocks = engine.port.reserve(2)
            assert blocks is not None
        with pytest.raises(ValueError, match=r"outside the vocabulary|already in use"):
            engine.add_request(prompt, SamplingParams(), request_id, pinned_blocks=blocks)
    assert engine.abort("y")
    assert_idle(engine)


def test_duplicate_request_id(make_engine: MakeEngine) -> None:
    engine = make_engine()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), request_id="x")
    with pytest.raises(ValueError, match="request id 'x' is already in use"):
        engine.add_request([4, 5], SamplingParams(), request_id="x")
    assert engine.abort("x")


def test_failed_batch_admits_nothing(make_engine: MakeEngine) -> None:
    engine = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match="context window"):
        engine.generate([[1, 2, 3], list(range(100, 170))], SamplingParams(max_tokens=4))
    assert_idle(engine)


def test_kv_cache_too_small_for_context(default_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match=r"holds 1 blocks .* raise kv_cache_bytes"):
        EngineArgs(max_model_len=1024, kv_cache_bytes=400_000).create_engine(default_checkpoint)


def test_unknown_formats_name_the_choices(default_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match="unknown linear format 'int3'; choose one of"):
        EngineArgs(linear="int3", max_model_len=64).create_engine(default_checkpoint)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        EngineArgs(kernel_backend="cuda", max_model_len=64).create_engine(default_checkpoint)
    with pytest.raises(ValueError, match="unknown dtype 'fp64'"):
        EngineArgs(dtype="fp64", max_model_len=64).create_engine(default_checkpoint)


def test_quantized_kernels_refuse_an_activation_dtype_at_load(default_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match="triton backend's int4 kernels take bfloat16, float16"):
        EngineArgs(
            kernel_backend="triton", linear="int4", dtype="float32", max_model_len=64
        ).create_engine(default_checkpoint)
