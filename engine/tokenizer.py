"""Text <-> token ids for a loaded model: encoding, decoding, the chat template, streaming.

The loaders build a `Tokenizer` from whatever the checkpoint ships (an HF `tokenizer.json`,
or the vocabulary and merges inside a GGUF); everything downstream sees only this class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import tokenizers
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the model says about BOS, EOS and chat prompts.

    `encode` never lets the backend add special tokens; it prepends BOS itself when the
    model asks for it (`add_bos_token`), so GGUF and HF checkpoints behave alike.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos_token: bool = False,
        chat_template: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self.backend = backend
        self._byte_level = isinstance(backend.decoder, tokenizers.decoders.ByteLevel)
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos_token = add_bos_token and bos_token_id is not None
        bos_token = None if bos_token_id is None else backend.id_to_token(bos_token_id)
        if eos_token is None and eos_token_ids:
            eos_token = backend.id_to_token(eos_token_ids[0])
        self.chat_template = (
            None if chat_template is None else ChatTemplate(chat_template, bos_token, eos_token)
        )

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (may be < the model's rows)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """The text's ids. Through `encode_batch`, which lets go of the GIL while it works
        (`encode` holds it: a 2 MB prompt stopped every other thread for 2-3 s)."""
        ids: list[int] = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos_token:
            assert self.bos_token_id is not None
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level spelling for BPE), None for an unknown id."""
        token: str | None = self.backend.id_to_token(token_id)
        return token

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self.backend.token_to_id(token)
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; b"" for an unknown id.

        A byte-level BPE token may hold part of a UTF-8 character: decoded alone it shows
        U+FFFD, while its bytes are exact, and a sequence's bytes joined are its text's.
        Added tokens (special ones included) are their spelling. Other vocabularies map
        sentencepiece byte-fallback pieces (`<0xE2>`) to their byte, any other piece to the
        UTF-8 of its text decoded alone.
        """
        added = self._added.get(token_id)
        if added is not None:
            return added.encode()
        piece: str | None = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if not self._byte_level and (fallback := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(fallback[1], 16)])
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text for a conversation, exactly as HF `apply_chat_template` renders it
        (`continue_final_message`: ending inside the last message, as transformers does)."""
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template; send a plain prompt (completions) instead"
            )
        return self.chat_template.render(messages, add_generation_prompt, continue_final_message)

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Token ids of the rendered conversation; the template writes any BOS itself."""
        text = self.apply_chat_template(messages, add_generation_prompt, continue_final_message)
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return ids

    def save(self, path: str | Path) -> None:
        """Write the backend as a `tokenizer.json`."""
        self.backend.save(str(path))


class ChatTemplate:
    """A model's Jinja chat template in the environment HF renders it with.

    Templates ship inside checkpoints, so they are untrusted code and run in jinja2's
    immutable sandbox. Matching transformers' environment (`trim_blocks`, `lstrip_blocks`,
    `loopcontrols`, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`)
    keeps prompts byte-identical to the ones the model was tuned on.
    """

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
        self.source = source
        self._special_tokens = {
            name: token
            for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
            if token is not None
        }

    def __reduce__(self) -> tuple[type[ChatTemplate], tuple[str, str | None, str | None]]:
        # A compiled template does not pickle; its source does (tokenizers travel to the
        # router over Ray).
        tokens = self._special_tokens
        return ChatTemplate, (self.source, tokens.get("bos_token"), tokens.get("eos_token"))

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """ValueError for a malformed message, when the template rejects the conversation
        (e.g. roles out of order), or when it fails on what a message holds (a key of a type
        it does not expect): all the client's to fix.

        `continue_final_message` leaves the last message open, so the model continues it
        instead of answering it: transformers' way, a marker appended to that message's
        content and the rendering cut where the marker lands (whatever the template writes
        after a message, such as its end-of-turn token, falls away with it).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        checked = [_checked_message(i, m) for i, m in enumerate(messages)]
        if continue_final_message:
            if not checked:
                raise ValueError("continue_final_message needs a final message to continue")
            final = checked[-1]["content"]
            checked[-1]["content"] = final + _CONTINUE_MARKER
        try:
            rendered: str = self._template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template rejected the conversation: {e}") from e
        except Exception as e:  # e.g. `'text' + message['content']` meeting tool_calls' list
            # The template is the model's and the messages the client's: whatever fails
            # between them is the request's to fix (vLLM answers these with a 400 too).
            raise ValueError(
                f"chat template cannot render the conversation: {type(e).__name__}: {e}"
            ) from e
        if not continue_final_message:
            return rendered
        marker = _CONTINUE_MARKER.strip()
        if final.strip() not in rendered or marker not in rendered:
            raise ValueError(
                "continue_final_message: the chat template does not keep the final message "
                "whole, so it cannot be continued"
            )
        at = rendered.rindex(marker)
        if rendered.startswith(_CONTINUE_MARKER, at):
            return rendered[:at]
        return rendered[:at].rstrip()  # the template strips trailing space: the message's too


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        body: list[nodes.Node] = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return body


_CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' own, so prompts match its


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level spelling inverted: the character a vocabulary writes for a byte ->
    that byte. Printable Latin-1 bytes stand for themselves; the other 68 bytes are written
    as the code points from U+0100 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable} | {b: chr(0x100 + i) for i, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _gpt2_byte_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _checked_message(index: int, message: Message) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"messages[{index}] lacks {key!r}")
        if not isinstance(message[key], str):
            raise ValueError(
                f"messages[{index}].{key} must be a string, got {type(message[key]).__name__}"
            )
    return dict(message)


_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting half a character.

    Decoding ids one at a time goes wrong twice: a byte-level token may hold part of a
    multi-byte UTF-8 character (alone it decodes to U+FFFD), and sentencepiece decoders drop
    the leading space of the first token they see. So each step decodes a short window that
    starts at a character boundary and emits what it adds beyond the text already sent,
    holding back trailing U+FFFD until the bytes completing it arrive (`flush` releases it
    at the end of the stream: those bytes were really invalid).

        ids:  context | ... | prefix_offset ...... read_offset ...... len(ids)
                              window start         text of the window
                              (char boundary)      up to here is sent
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # A few prompt tokens give the first generated token its left context (its space).
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted = len(self._decode(self._ids))  # chars of the window already sent
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """The generated ids pushed so far (prompt context excluded)."""
        return self._ids[self._num_context :]

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (often "", e.g. mid-character)."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset :])
        complete = window.rstrip(_REPLACEMENT)
        delta = complete[self._emitted :]
        self._emitted = max(self._emitted, len(complete))
        if len(complete) == len(window):
            # Every byte so far forms whole characters: restart the window at the last
            # boundary, keeping one step of left context.
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._emitted = len(self._decode(self._ids[self._prefix_offset :]))
        self._text += delta
        return delta

    def flush(self) -> str:
        """At the end of the stream: release held-back text (invalid or literal U+FFFD)."""
        delta = self._decode(self._ids[self._prefix_offset :])[self._emitted :]
        self._emitted += len(delta)
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip_special_tokens)
