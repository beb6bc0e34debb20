"""What every loader produces: a model ready to build, whatever format it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Config, tensors by HF name (validated by `tensor_layout`), tokenizer and identity.

    `model_id` and `weights_digest` feed the KV fingerprint (engine.hashing.KVFingerprint).
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    model_id: str
    weights_digest: str
    source: Path

    def __post_init__(self) -> None:
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"{self.source}: the tokenizer has {self.tokenizer.vocab_size} tokens but the "
                f"model's embedding only {self.config.vocab_size} rows"
            )
