"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers.Tokenizer`.

A GGUF carries no `tokenizer.json`: only the vocabulary (in GPT-2's byte-to-unicode
spelling), the merges, a type per token and the name of llama.cpp's pre-tokenizer
(`tokenizer.ggml.pre`). The split rules below are llama.cpp's for each name, which are
the ones the model's original `tokenizer.json` declares. Notably `smollm` (SmolLM2) splits
every digit on its own before the GPT-2 regex, like the HF tokenizer's `Digits` step;
transformers' GGUF conversion omits that step, so it tokenizes a whitespace run followed
by a digit ("a  1") differently from the model's own tokenizer.
"""

from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from engine.loaders.gguf_file import GGUFFile
from engine.tokenizer import Tokenizer

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_SPLIT = r"\p{N}"

# `tokenizer.ggml.pre` -> (regex applied before ByteLevel or None, whether ByteLevel also
# applies the GPT-2 regex, whether whole-word vocabulary hits skip the merges)
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, True, False),
    "gpt-2": (None, True, False),
    "smollm": (_DIGITS_SPLIT, True, False),
    "starcoder": (_DIGITS_SPLIT, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """Byte-level BPE from the file's vocabulary; ValueError for other tokenizer kinds."""
    kind = gguf.get_str("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{gguf.path}: tokenizer.ggml.model {kind!r} is not supported from GGUF; Baton "
            "rebuilds byte-level BPE ('gpt2') vocabularies. Load the model's HF folder instead."
        )
    pre = gguf.get_str("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{gguf.path}: tokenizer.ggml.pre {pre!r} is not supported; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    split, gpt2_regex, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens = [str(t) for t in gguf.get_list("tokenizer.ggml.tokens")]
    merges = [_merge_pair(str(m)) for m in gguf.get_list("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    backend.pre_tokenizer = (
        byte_level
        if split is None
        else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    )
    backend.decoder = decoders.ByteLevel()
    _add_marked_tokens(backend, tokens, vocab, gguf)
    # llama.cpp ends generation at any of these (end of text, of turn, of message).
    eos_keys = [f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom")]
    eos_ids = [gguf.get_int(key) for key in eos_keys if key in gguf]
    bos_key, template_key = "tokenizer.ggml.bos_token_id", "tokenizer.chat_template"
    return Tokenizer(
        backend,
        bos_token_id=gguf.get_int(bos_key) if bos_key in gguf else None,
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        add_bos_token=gguf.get_bool("tokenizer.ggml.add_bos_token", False),
        chat_template=gguf.get_str(template_key) if template_key in gguf else None,
    )


def _add_marked_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], vocab: dict[str, int], gguf: GGUFFile
) -> None:
    """Control tokens (<|im_start|>) become special, user-defined ones (<think>) plain added
    tokens: both must match whole in text instead of going through BPE."""
    if "tokenizer.ggml.token_type" not in gguf:
        return
    types = gguf.get_list("tokenizer.ggml.token_type")
    special, added = [], []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # A duplicated spelling has one id in `vocab`; adding it again would grow the vocab.
        if vocab[token] != i:
            continue
        if kind == _CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(added)


def _merge_pair(merge: str) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    return left, right
