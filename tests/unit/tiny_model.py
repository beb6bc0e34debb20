"""A tiny random Llama with the default model's tokenizer: the real engine, fast enough to
drive thousands of steps in a property test."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.loaders import LoadedCheckpoint
from engine.loaders.tensor_layout import expected_shapes
from engine.tokenizer import Tokenizer


def tiny_checkpoint(tokenizer_source: LoadedCheckpoint, seed: int = 0) -> LoadedCheckpoint:
    """The tiny model over `tokenizer_source`'s tokenizer and vocabulary."""
    source = tokenizer_source
    return tiny_model(source.tokenizer, source.config.vocab_size, source.config.eos_token_ids, seed)


def tiny_model(
    tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...] = (), seed: int = 0
) -> LoadedCheckpoint:
    """The tiny random Llama over any tokenizer (e.g. a toy vocabulary)."""
    config = ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=64,  # INT4 groups need K divisible by 64
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_ids=eos_token_ids,
    )
    g = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=g) * (1.0 if name.endswith("norm.weight") else 0.2)
        for name, shape in expected_shapes(config).items()
    }
    return LoadedCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        model_id="tiny-random-llama",
        weights_digest=f"{seed:064x}",
        source=Path("<memory>"),
    )
