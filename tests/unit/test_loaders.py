"""GGUF loading (the default SmolLM2 file and small GGUFs written here), path dispatch,
and the weights digest. HF folders are covered in test_hf_loader.py."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from engine.config import RopeScaling
from engine.loaders import LoadedCheckpoint, load_checkpoint
from engine.loaders.gguf_file import GGUFFile
from engine.loaders.tensor_layout import expected_shapes
from engine.loaders.weights_digest import digest_cache_path, weights_digest

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hf_gguf_state_dict(hf_gguf_model: Any) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loading of the default model (dequantize + un-permute)."""
    return dict(hf_gguf_model.state_dict())


def test_default_gguf_config(default_checkpoint: LoadedCheckpoint) -> None:
    c = default_checkpoint.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert c.tie_word_embeddings and not c.qkv_bias and c.rope_scaling is None
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert default_checkpoint.model_id == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    tok = default_checkpoint.tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, (2,), False)
    assert tok.vocab_size == c.vocab_size


def test_default_gguf_tensors_complete(default_checkpoint: LoadedCheckpoint) -> None:
    tensors = default_checkpoint.tensors
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert shapes == expected_shapes(default_checkpoint.config)
    assert len(tensors) == 2 + 30 * 9 and "lm_head.weight" not in tensors
    assert shapes["model.layers.7.self_attn.k_proj.weight"] == (192, 576)
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_default_gguf_equals_transformers(
    default_checkpoint: LoadedCheckpoint, hf_gguf_state_dict: dict[str, torch.Tensor]
) -> None:
    ours = default_checkpoint.tensors
    # transformers materializes the tied head as its own entry; ours leaves it out.
    assert set(hf_gguf_state_dict) - set(ours) == {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf_gguf_state_dict[name]), name
    assert torch.equal(hf_gguf_state_dict["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_gguf_q_k_rows_are_unpermuted(
    default_gguf: Path, hf_gguf_state_dict: dict[str, torch.Tensor]
) -> None:
    """The raw GGUF rows differ from HF's: the equality above is the un-permutation's doing."""
    stored = torch.from_numpy(GGUFFile(default_gguf).dequantize("blk.3.attn_k.weight"))
    hf = hf_gguf_state_dict["model.layers.3.self_attn.k_proj.weight"]
    assert not torch.equal(stored, hf)
    assert torch.equal(stored[1], hf[32])  # head 0: GGUF row 1 is HF row head_dim / 2


def test_default_digest_is_sha256_of_file(
    default_checkpoint: LoadedCheckpoint, default_gguf: Path
) -> None:
    assert (
        default_checkpoint.weights_digest == hashlib.sha256(default_gguf.read_bytes()).hexdigest()
    )


# --- small GGUFs written by the tests ------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 128, 2, 1, 64, 64
THETA = 500000.0


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode spelling of the 256 bytes: a complete byte-level vocabulary."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    spelled = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [spelled[b] for b in range(256)]


TOKENS = [*byte_level_alphabet(), "Ġt", "<|end|>"]


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, which the loader must undo."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_freqs(factor: float, low: float, high: float) -> np.ndarray:
    """convert_hf_to_gguf.py's per-frequency divisors for Llama 3 rope scaling."""
    out = []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * math.pi * THETA ** (i / HEAD_DIM)
        if wavelen < 8192 / high:
            out.append(1.0)
        elif wavelen > 8192 / low:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(
    path: Path, hf: dict[str, np.ndarray], arch: str = "llama", rope_freqs: np.ndarray | None = None
) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (len(TOKENS) - 1) + [3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(len(TOKENS) - 1)
    writer.add_eos_token_id(len(TOKENS) - 1)
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    for name, values in hf.items():
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, HEADS)
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, KV_HEADS)
        writer.add_tensor(gguf_names[name], values)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_hf_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (len(TOKENS), HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (len(TOKENS), HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "model.layers.0.mlp.gate_proj.weight": (INTER, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (INTER, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, INTER),
    }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def test_written_gguf_round_trips_to_hf_layout(tmp_path: Path) -> None:
    hf = random_hf_tensors()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    checkpoint = load_checkpoint(path)
    assert set(checkpoint.tensors) == set(hf)
    for name, values in hf.items():
        assert torch.equal(checkpoint.tensors[name], torch.from_numpy(values)), name
    c = checkpoint.config
    assert (c.num_layers, c.head_dim, c.tie_word_embeddings, c.rope_scaling) == (1, 64, False, None)
    assert checkpoint.model_id == "tiny-llama"
    assert checkpoint.tokenizer.encode(" t<|end|> t") == [256, 257, 256]


def test_written_gguf_bfloat16(tmp_path: Path) -> None:
    hf = random_hf_tensors()
    write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    tensors = load_checkpoint(tmp_path / "tiny.gguf", dtype=torch.bfloat16).tensors
    q = torch.from_numpy(hf["model.layers.0.self_attn.q_proj.weight"]).to(torch.bfloat16)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], q)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    write_tiny_gguf(
        tmp_path / "l3.gguf", random_hf_tensors(), rope_freqs=llama3_rope_freqs(32, 1, 4)
    )
    scaling = load_checkpoint(tmp_path / "l3.gguf").config.rope_scaling
    assert isinstance(scaling, RopeScaling)
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == (
        "llama3",
        32.0,
        8192,
    )
    assert scaling.low_freq_factor == pytest.approx(1.0, rel=1e-3)
    assert scaling.high_freq_factor == pytest.approx(4.0, rel=1e-3)


def test_gguf_rope_freqs_of_another_shape_is_refused(tmp_path: Path) -> None:
    freqs = np.linspace(1, 8, HEAD_DIM // 2, dtype=np.float32)
    write_tiny_gguf(tmp_path / "odd.gguf", random_hf_tensors(), rope_freqs=freqs)
    with pytest.raises(ValueError, match=r"odd\.gguf: rope_freqs\.weight does not follow Llama 3"):
        load_checkpoint(tmp_path / "odd.gguf")


def test_gguf_unknown_architecture(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf: unsupported architecture 'gpt2'.*llama"):
        load_checkpoint(tmp_path / "gpt2.gguf")


def test_gguf_missing_tensor_names_it(tmp_path: Path) -> None:
    hf = random_hf_tensors()
    del hf["model.layers.0.mlp.up_proj.weight"]
    write_tiny_gguf(tmp_path / "holey.gguf", hf)
    with pytest.raises(ValueError, match=r"holey\.gguf.*missing.*model\.layers\.0\.mlp\.up_proj"):
        load_checkpoint(tmp_path / "holey.gguf")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent", r"absent' does not exist"),
        (lambda d: d, r"is a folder without config\.json"),
        (lambda d: d / "weights.bin", r"weights\.bin' is not a \.gguf file"),
    ],
)
def test_bad_model_paths(tmp_path: Path, make, message: str) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(make(tmp_path))


def test_file_named_gguf_without_magic(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match=r"fake\.gguf is not a GGUF file"):
        load_checkpoint(tmp_path / "fake.gguf")


@pytest.mark.parametrize("size", [0, 10, 2000, 50_000_000])
def test_truncated_gguf_names_the_file(tmp_path: Path, default_gguf: Path, size: int) -> None:
    """A cut-off download: in the header's fixed part, in the metadata, in the tensor data."""
    with default_gguf.open("rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(size))
    with pytest.raises(ValueError, match=r"cut\.gguf is truncated or corrupt \(.+\)$"):
        load_checkpoint(tmp_path / "cut.gguf")


def test_weights_digest_memoized_and_invalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x" * (3 << 20) + b"tail")
    b.write_bytes(b"second")
    expected = hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    assert weights_digest([a, b]) == expected
    cache = json.loads(digest_cache_path().read_text())
    assert list(cache.values()) == [expected]
    assert str(a.resolve()) in next(iter(cache))
    key = next(iter(cache))
    digest_cache_path().write_text(json.dumps({key: "memoized"}))
    assert weights_digest([a, b]) == "memoized"  # a hit reads the cache, not the files
    b.write_bytes(b"changed")  # new size and mtime: a new key, a fresh hash
    assert weights_digest([a, b]) == hashlib.sha256(a.read_bytes() + b"changed").hexdigest()
    assert sorted(json.loads(digest_cache_path().read_text()).values()) == sorted(
        ["memoized", weights_digest([a, b])]
    )
