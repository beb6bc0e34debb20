"""Load a Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer.json.

Weights may be one `model.safetensors` or shards listed in `model.safetensors.index.json`.
The tokenizer comes from `tokenizer.json`, with BOS/EOS and the chat template from
`tokenizer_config.json` (or `chat_template.jinja`), and extra EOS ids from
`generation_config.json`: generation stops at any EOS any of these files names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import load_file

from engine.config import ModelConfig, RopeScaling
from engine.loaders.checkpoint import LoadedCheckpoint
from engine.loaders.tensor_layout import validate_tensors
from engine.loaders.weights_digest import weights_digest
from engine.tokenizer import Tokenizer

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_INDEX_FILE = "model.safetensors.index.json"


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights, in a stable order."""
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index} lists shard {f.name!r}, which is not in {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{folder} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)"
        )
    return files


def load_hf(folder: Path, dtype: torch.dtype) -> LoadedCheckpoint:
    """A checkpoint folder; its model id is config.json's `_name_or_path`, else the folder name."""
    raw = _read_json(folder / "config.json")
    files = _weight_files(folder)
    tokenizer = _tokenizer(folder, raw)
    try:
        config = _model_config(raw, tokenizer)
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(f).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old exports saved; RoPE is recomputed from config
            tensors[name] = tensor.to(dtype)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports save the tied copy too
    validate_tensors(tensors, config, folder)
    model_id = str(raw.get("_name_or_path") or folder.name)
    return LoadedCheckpoint(config, tensors, tokenizer, model_id, weights_digest(files), folder)


def _model_config(raw: dict[str, Any], tokenizer: Tokenizer) -> ModelConfig:
    """ValueErrors name the offending field; the caller adds the file."""
    arch = _architecture(raw)
    if arch != "qwen2" and (raw.get("attention_bias") or raw.get("mlp_bias")):
        raise ValueError(f"attention_bias / mlp_bias are not supported for {arch}")
    hidden, num_heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
    max_positions = _int(raw, "max_position_embeddings")
    # The model attends over the whole context; with a sliding window that is exact only
    # up to the window, so the window caps the context it is allowed to serve.
    window = raw.get("sliding_window")
    if window and (arch == "mistral" or raw.get("use_sliding_window")):
        max_positions = min(max_positions, int(window))
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return ModelConfig(
        architecture=arch,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads),
        max_position_embeddings=max_positions,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        rope_scaling=_rope_scaling(rope),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
    )


def _architecture(raw: dict[str, Any]) -> str:
    """`architectures[0]` (e.g. LlamaForCausalLM), else `model_type` (e.g. llama)."""
    classes = raw.get("architectures")
    if isinstance(classes, list) and classes:
        found = str(classes[0])
        arch = _ARCHITECTURES.get(found)
    else:
        found = str(raw.get("model_type"))
        arch = found if found in _ARCHITECTURES.values() else None
    if arch is None:
        raise ValueError(
            f"unsupported architecture {found!r}; Baton serves "
            f"{', '.join(_ARCHITECTURES)} ({', '.join(_ARCHITECTURES.values())})"
        )
    return arch


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    optional = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return RopeScaling(
        rope_type=str(rope_type),
        factor=float(rope.get("factor", 1.0)),
        **{k: rope[k] for k in optional if k in rope},
    )


def _tokenizer(folder: Path, raw_config: dict[str, Any]) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"{folder} has no tokenizer.json (sentencepiece-only folders are not supported)"
        )
    backend = tokenizers.Tokenizer.from_file(str(path))
    tok_config = _read_json(folder / "tokenizer_config.json", missing_ok=True)
    generation = _read_json(folder / "generation_config.json", missing_ok=True)
    bos_token = _token_text(tok_config, "bos_token")
    eos_token = _token_text(tok_config, "eos_token")
    bos_id = raw_config.get("bos_token_id")
    if bos_id is None and bos_token is not None:
        bos_id = backend.token_to_id(bos_token)
    eos_ids = [*_ids(raw_config.get("eos_token_id")), *_ids(generation.get("eos_token_id"))]
    eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)
    if eos_token_id is not None:
        eos_ids.append(eos_token_id)
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # no flag: the tokenizer.json post-processor decides, as in HF
        add_bos = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else _template(tok_config)
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        add_bos_token=bool(add_bos),
        chat_template=template,
        eos_token=eos_token,
    )


def _template(tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(tok_config: dict[str, Any], key: str) -> str | None:
    value = tok_config.get(key)
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _int(raw: dict[str, Any], key: str) -> int:
    if not isinstance(raw.get(key), int):
        raise ValueError(f"{key!r} must be an integer, got {raw.get(key)!r}")
    return int(raw[key])


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data
