"""The default model's tokenizer against transformers' tokenizer of the same GGUF, the chat
template against `apply_chat_template`, and streaming detokenization."""

from __future__ import annotations

import copy
import random
import threading
import time
from typing import Any

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from engine.loaders import LoadedCheckpoint
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

SHARED = [
    "Hello world",
    " Hello world",
    "Hello, world! How are you?",
    "",
    "   ",
    "\n\n\n",
    "\t\tindented",
    "a  b   c    d",
    "trailing spaces   ",
    "line1\nline2\r\nline3",
    "It's 2024; she'll pay $3.50 (or 12,345.67€).",
    "version 1.2.3, phone +1 (555) 010-9999",
    "ünïcödé façade naïve Ærøskøbing",
    "日本語のテキストです。",
    "中文测试，标点符号！",
    "Привет, мир!",
    "مرحبا بالعالم",
    "हिन्दी पाठ",
    "emoji 🦜🚀👩‍👩‍👧‍👦 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<repo_name>baton<file_sep>main.py",
    "<|im_start|> spaced <|im_end|>",
    "<|im_start|",
    "URL: https://example.com/path?q=1&r=2#frag",
    "don't can't won't I'm you're ALLCAPS MiXeD",
]
# A whitespace run before a numeral: transformers' GGUF conversion skips SmolLM2's
# digit-splitting pre-tokenizer step (see engine/loaders/gguf_tokenizer.py) and differs here.
DIGIT_AFTER_WHITESPACE = ["a  1", "x   42", "  2024", "x² + y² = z²  ½"]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Translate 'chat' to French."},
        {"role": "assistant", "content": "« chat » 🐈"},
        {"role": "user", "content": "And to 日本語?"},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": '{"q": "weather"}\n\n  indented'},
        {"role": "assistant", "content": '{"a": "sunny"}'},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint: LoadedCheckpoint) -> Tokenizer:
    return default_checkpoint.tokenizer


@pytest.mark.parametrize("text", SHARED)
def test_ids_match_transformers(tokenizer: Tokenizer, hf_gguf_tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", SHARED + DIGIT_AFTER_WHITESPACE)
def test_ids_match_smollm2_pre_tokenizer(
    tokenizer: Tokenizer, hf_gguf_tokenizer: Any, text: str
) -> None:
    """SmolLM2's tokenizer.json pre-tokenizes with Digits(individual) then ByteLevel."""
    reference = copy.deepcopy(hf_gguf_tokenizer)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)


def test_digit_after_whitespace_run(tokenizer: Tokenizer) -> None:
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("a  1")] == ["a", "ĠĠ", "1"]


def test_special_tokens_are_single_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tokenizer.decode([1, 9906, 2]) == tokenizer.decode([9906])
    assert tokenizer.token_to_id("<|im_end|>") == 2


def test_add_bos_token_prepends_bos(tokenizer: Tokenizer) -> None:
    with_bos = Tokenizer(tokenizer.backend, bos_token_id=1, eos_token_ids=(2,), add_bos_token=True)
    assert with_bos.encode("Hello") == [1, *tokenizer.encode("Hello")]


def test_encoding_lets_other_threads_run(tokenizer: Tokenizer) -> None:
    """The router tokenizes in a worker thread; that helps only if the encoder lets go of
    the GIL (tokenizers' `encode` holds it: the loop would stop for the whole prompt)."""
    text = "The quick brown fox jumps over the lazy dog. 12345 " * 20_000  # 1 MB
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    took = time.perf_counter() - start
    done.set()
    ticker.join()
    assert ids == tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert max(gaps) < took / 2, f"a {took:.2f} s encode held other threads {max(gaps):.2f} s"


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer,
    hf_gguf_tokenizer: Any,
    conversation: list[dict[str, str]],
    add_generation_prompt: bool,
) -> None:
    expected = hf_gguf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt) == expected
    assert tokenizer.encode_chat(conversation, add_generation_prompt) == (
        hf_gguf_tokenizer.encode(expected, add_special_tokens=False)
    )


@pytest.mark.parametrize(
    "conversation",
    [
        *CONVERSATIONS,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here "}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  « chat » 🐈\n"}],
    ],
)
def test_continue_final_message_matches_transformers(
    tokenizer: Tokenizer, hf_gguf_tokenizer: Any, conversation: list[dict[str, str]]
) -> None:
    expected = hf_gguf_tokenizer.apply_chat_template(
        conversation, tokenize=False, continue_final_message=True
    )
    rendered = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == expected
    assert rendered.endswith(conversation[-1]["content"])
    assert tokenizer.encode_chat(conversation, False, True) == (
        hf_gguf_tokenizer.encode(expected, add_special_tokens=False)
    )


def test_continue_final_message_refusals(tokenizer: Tokenizer) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="exclude each other"):
        tokenizer.apply_chat_template(hi, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="needs a final message"):
        tokenizer.apply_chat_template([], add_generation_prompt=False, continue_final_message=True)
    dropping = Tokenizer(
        tokenizer.backend,
        bos_token_id=None,
        eos_token_ids=(2,),
        chat_template="{% for m in messages %}{{ m['role'] }}{% endfor %}",
    )
    with pytest.raises(ValueError, match="does not keep the final message whole"):
        dropping.apply_chat_template(hi, add_generation_prompt=False, continue_final_message=True)


@pytest.mark.parametrize("text", [text for text in SHARED if text])
def test_token_bytes_join_into_the_texts_utf8(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()


def test_token_bytes_of_a_split_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🦜")
    assert [tokenizer.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\xa6", b"\x9c"]
    assert tokenizer.decode(ids[:1]) == "\ufffd"  # why the bytes cannot come from the text
    assert tokenizer.token_bytes(tokenizer.vocab_size + 5) == b""


def test_token_bytes_of_sentencepiece_byte_fallback() -> None:
    vocab = {"<unk>": 0, "<0xF0>": 1, "<0x9F>": 2, "▁Hello": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    spm = Tokenizer(backend, bos_token_id=None, eos_token_ids=())
    assert [spm.token_bytes(i) for i in (1, 2)] == [b"\xf0", b"\x9f"]
    assert spm.token_bytes(3) == b"Hello"  # other pieces: their text decoded alone


def test_chat_message_errors(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"messages\[1\] lacks 'content'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.role must be a string, got int"):
        tokenizer.apply_chat_template([{"role": 3, "content": "a"}])


def test_model_without_chat_template(tokenizer: Tokenizer) -> None:
    bare = Tokenizer(tokenizer.backend, bos_token_id=None, eos_token_ids=(2,))
    with pytest.raises(ValueError, match="no chat template"):
        bare.encode_chat([{"role": "user", "content": "hi"}])


def test_template_helpers(tokenizer: Tokenizer) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    custom = Tokenizer(
        tokenizer.backend, bos_token_id=1, eos_token_ids=(2,), chat_template=template
    )
    rendered = custom.apply_chat_template([{"role": "user", "content": "é"}])
    assert rendered == '<|im_start|>[{"role": "user", "content": "é"}]<|im_end|>'
    with pytest.raises(ValueError, match="rejected the conversation: user first"):
        custom.apply_chat_template([{"role": "system", "content": "x"}])


def test_messages_reach_the_template_whole_and_its_failures_are_the_requests(
    tokenizer: Tokenizer,
) -> None:
    """transformers hands the template whole message dicts; a template that cannot take
    what one holds (here text + a list) fails the request, as vLLM's 400, not the server."""
    template = "{% for m in messages %}{{ m['content'] + (m['tool_calls'] or '') }}{% endfor %}"
    custom = Tokenizer(
        tokenizer.backend, bos_token_id=None, eos_token_ids=(2,), chat_template=template
    )
    assert custom.apply_chat_template([{"role": "user", "content": "a", "tool_calls": "b"}]) == "ab"
    called = [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}]
    with pytest.raises(ValueError, match=r"cannot render the conversation: TypeError: can only"):
        custom.apply_chat_template(called)


def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas) and detok.token_ids == ids
    return deltas, detok.text


def test_detokenizer_reproduces_decode_on_random_streams(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            _, text = _stream(tokenizer, ids, skip)
            assert text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_back_split_characters(tokenizer: Tokenizer) -> None:
    text = "naïve 日本語 🦜🚀👩‍👧 done"
    ids = tokenizer.encode(text)
    deltas, streamed = _stream(tokenizer, ids)
    assert streamed == text
    assert "" in deltas[:-1]  # some character spans several tokens
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_flushes_invalid_bytes(tokenizer: Tokenizer) -> None:
    lead_byte = tokenizer.token_to_id("ð")  # 0xF0 opens a 4-byte character
    assert lead_byte is not None
    (ok,) = tokenizer.encode("ok")
    ids = [ok, lead_byte]
    deltas, streamed = _stream(tokenizer, ids)
    assert deltas == ["ok", "", "\ufffd"]
    assert streamed == tokenizer.decode(ids)


def test_detokenizer_with_prompt_context(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("<|im_start|>assistant\nSure")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    for token_id in tokenizer.encode(", here: ü🦜"):
        detok.push(token_id)
    assert detok.text == ", here: ü🦜"


def test_detokenizer_keeps_sentencepiece_leading_space_with_context() -> None:
    """Metaspace decoding drops the first token's leading space; prompt context keeps it."""
    backend = tokenizers.Tokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1}, unk_token="▁"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    spm = Tokenizer(backend, bos_token_id=None, eos_token_ids=())
    assert IncrementalDetokenizer(spm).push(1) == "world"
    detok = IncrementalDetokenizer(spm, prompt_ids=[0])
    assert [detok.push(1), detok.push(1)] == [" world", " world"]
    assert detok.text == spm.decode([0, 1, 1])[len("Hello") :]
