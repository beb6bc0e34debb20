"""HF checkpoint folders written by transformers' own `save_pretrained` (random tiny models),
with the default model's tokenizer saved beside them as tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.config import RopeScaling
from engine.loaders import LoadedCheckpoint, load_checkpoint

torch.set_num_threads(2)

TINY = dict(
    vocab_size=49152,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


def save_model(
    folder: Path, checkpoint: LoadedCheckpoint, model_cls: str, config_cls: str, **config: Any
) -> dict[str, torch.Tensor]:
    """A random model saved by transformers, plus tokenizer files; returns its state dict."""
    torch.manual_seed(0)
    shard = config.pop("max_shard_size", None)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TINY, **config))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    checkpoint.tokenizer.save(folder / "tokenizer.json")
    tokenizer_config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def llama_folder(tmp_path: Path, default_checkpoint: LoadedCheckpoint) -> Path:
    save_model(
        tmp_path,
        default_checkpoint,
        "LlamaForCausalLM",
        "LlamaConfig",
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        bos_token_id=1,
        eos_token_id=[0, 2],
    )
    return tmp_path


def test_llama_single_file(tmp_path: Path, default_checkpoint: LoadedCheckpoint) -> None:
    written = save_model(
        tmp_path,
        default_checkpoint,
        "LlamaForCausalLM",
        "LlamaConfig",
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        bos_token_id=1,
        eos_token_id=[0, 2],
    )
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    checkpoint = load_checkpoint(tmp_path)
    assert set(checkpoint.tensors) == set(written)
    for name, tensor in written.items():
        assert torch.equal(checkpoint.tensors[name], tensor), name
    c = checkpoint.config
    assert (c.architecture, c.num_layers, c.head_dim, c.num_kv_heads) == ("llama", 2, 8, 2)
    assert (c.rope_theta, c.tie_word_embeddings, c.qkv_bias) == (500000.0, False, False)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (0, 2))
    assert checkpoint.model_id == tmp_path.name and checkpoint.source == tmp_path


def test_llama_tokenizer_from_folder(
    llama_folder: Path, default_checkpoint: LoadedCheckpoint
) -> None:
    tokenizer = load_checkpoint(llama_folder).tokenizer
    text = "<|im_start|>user\nSpaces  2024 ünïcödé 🦜<|im_end|>"
    assert tokenizer.encode(text) == default_checkpoint.tokenizer.encode(text)
    assert tokenizer.add_bos_token is False  # tokenizer.json adds no BOS, config says none
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<user>hi<|im_end|>"


def test_llama_sharded(tmp_path: Path, default_checkpoint: LoadedCheckpoint) -> None:
    written = save_model(
        tmp_path, default_checkpoint, "LlamaForCausalLM", "LlamaConfig", max_shard_size="2MB"
    )
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2
    checkpoint = load_checkpoint(tmp_path)
    assert set(checkpoint.tensors) == set(written)
    for name, tensor in written.items():
        assert torch.equal(checkpoint.tensors[name], tensor), name


def test_qwen2_qkv_bias_and_tied_head(tmp_path: Path, default_checkpoint: LoadedCheckpoint) -> None:
    written = save_model(
        tmp_path,
        default_checkpoint,
        "Qwen2ForCausalLM",
        "Qwen2Config",
        tie_word_embeddings=True,
        eos_token_id=0,
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    checkpoint = load_checkpoint(tmp_path)
    c = checkpoint.config
    assert (c.architecture, c.qkv_bias, c.tie_word_embeddings) == ("qwen2", True, True)
    # config, then generation_config, then tokenizer_config's eos_token (<|im_end|> = 2)
    assert c.eos_token_ids == (0, 2)
    assert torch.equal(
        checkpoint.tensors["model.layers.1.self_attn.k_proj.bias"],
        written["model.layers.1.self_attn.k_proj.bias"],
    )
    assert "lm_head.weight" not in checkpoint.tensors
    assert set(checkpoint.tensors) == set(written) - {"lm_head.weight"}


def test_bfloat16_load(llama_folder: Path) -> None:
    checkpoint = load_checkpoint(llama_folder, dtype=torch.bfloat16)
    assert {t.dtype for t in checkpoint.tensors.values()} == {torch.bfloat16}


def test_unknown_architecture_names_it(llama_folder: Path) -> None:
    config = json.loads((llama_folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json: unsupported architecture 'GPT2LMHeadModel'"
    ):
        load_checkpoint(llama_folder)


def _rewrite_weights(folder: Path, edit: Any) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_names_it(llama_folder: Path) -> None:
    _rewrite_weights(llama_folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"
    ):
        load_checkpoint(llama_folder)


def test_misshapen_tensor_names_it(llama_folder: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(8, 32)

    _rewrite_weights(llama_folder, shrink)
    with pytest.raises(
        ValueError,
        match=r"tensor 'model\.layers\.0\.self_attn\.v_proj\.weight' has shape \(8, 32\), "
        r"expected \(16, 32\)",
    ):
        load_checkpoint(llama_folder)


def test_unexpected_tensor_names_it(llama_folder: Path) -> None:
    def add_bias(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)

    _rewrite_weights(llama_folder, add_bias)
    with pytest.raises(
        ValueError, match=r"does not use: 'model\.layers\.0\.self_attn\.o_proj\.bias'"
    ):
        load_checkpoint(llama_folder)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        load_checkpoint(tmp_path)


def test_mistral_sliding_window_caps_context(
    tmp_path: Path, default_checkpoint: LoadedCheckpoint
) -> None:
    save_model(
        tmp_path, default_checkpoint, "MistralForCausalLM", "MistralConfig", sliding_window=128
    )
    config = load_checkpoint(tmp_path).config
    assert (config.architecture, config.max_position_embeddings) == ("mistral", 128)


def test_unsupported_rope_type_names_file_and_field(llama_folder: Path) -> None:
    config = json.loads((llama_folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json: unsupported rope_scaling\.rope_type 'yarn'"
    ):
        load_checkpoint(llama_folder)
