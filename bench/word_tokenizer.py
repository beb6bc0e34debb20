"""A word-per-id tokenizer for random-weight engines (benches and GPU tests).

Ids 2.. name the distinct words and punctuation of the calibration prose
(`engine.quant.CALIBRATION_TEXT`) in order of first appearance, so the FP8 KV cache's
calibration reads that prose as the same number of tokens, nearly all of them distinct
ids; the remaining ids are the words `t<id>`. Id 1 is the unknown word.
"""

from __future__ import annotations

import tokenizers

from engine.quant import CALIBRATION_TEXT
from engine.tokenizer import Tokenizer


def word_tokenizer(vocab_size: int, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    split = tokenizers.pre_tokenizers.Whitespace()
    words = split.pre_tokenize_str(CALIBRATION_TEXT.read_text(encoding="utf-8"))
    vocab = {"t0": 0, "t1": 1}
    for word, _ in words:
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    backend.pre_tokenizer = split
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=eos_token_ids)
