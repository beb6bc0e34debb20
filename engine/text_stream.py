"""A request's output text as it streams: detokenization and stop strings.

Text that might still turn into a stop string is held back: with stop strings of up to
L characters, the last L - 1 characters are released only once they cannot start one.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...], prompt_ids: Sequence[int] = ()
    ) -> None:
        # The prompt's last tokens are the first token's left context: a sentencepiece
        # decoder drops the leading space of a text's first token, which is not the output's.
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._text = ""
        self._released = 0
        self.stopped_by: str | None = None

    def push(self, token_id: int, check_stop: bool = True) -> None:
        """Add a sampled token; with `check_stop`, sets `stopped_by` when a stop string
        appears (and cuts the text there)."""
        self._append(self._detok.push(token_id), check_stop)

    def _append(self, new: str, check_stop: bool) -> None:
        if not new:
            return
        search_from = max(0, len(self._text) - self._holdback)
        self._text += new
        if not check_stop:
            return
        hits = [(at, s) for s in self._stop if (at := self._text.find(s, search_from)) >= 0]
        if hits:
            at, s = min(hits)
            self._text = self._text[:at]
            self.stopped_by = s

    def release(self, final: bool) -> str:
        """Text that is now certain, since the last call."""
        if final and self.stopped_by is None:
            # A trailing partial UTF-8 sequence will never complete: emit what it decodes to.
            self._append(self._detok.flush(), check_stop=False)
        end = len(self._text) if final or self.stopped_by else len(self._text) - self._holdback
        if end <= self._released:
            return ""
        out = self._text[self._released : end]
        self._released = end
        return out

    @property
    def text(self) -> str:
        return self._text
