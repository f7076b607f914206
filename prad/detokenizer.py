"""Incremental detokenization with stop strings: text grows by stable deltas only.

A delta is held back while the text ends in an incomplete UTF-8 sequence or in what could be the
start of a stop string, so the streamed pieces always concatenate to the final text, and the final
text never contains a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Detokenizer:
    """Each token is decoded in a short window (the tokens settled by the previous step plus the new
    ones), never the whole output again, so a token costs the same at position 5 or 5,000. Decoding a
    window that starts one settled step back reproduces the full decode's text (a byte-level BPE joins
    bytes; a SentencePiece tokenizer sees the preceding token, so leading spaces come out right); if a
    window ever disagrees with the text before it, the whole output is decoded once instead."""

    tokenizer: Any  # a transformers tokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    num_emitted_chars: int = 0
    is_stopped: bool = False  # a stop string was found
    text: str = ""  # the text so far (cut before a stop string once found)
    _settled: str = ""  # the text of token_ids[:_read_offset]
    _prefix_offset: int = 0  # the window decoded each step starts here...
    _read_offset: int = 0  # ...and tokens before this are settled into _settled
    _prefix_text: str = ""  # the text of token_ids[_prefix_offset:_read_offset], decoded alone

    def add(self, token_id: int) -> str:
        """Append one token; return the newly stable text (may be empty)."""
        self.token_ids.append(token_id)
        text = self._decode_new()
        cut = self._first_stop(text)
        if cut is not None:
            self.is_stopped = True
            self.text = text[:cut]
            return self._emit(len(self.text))
        self.text = text
        return self._emit(self._stable_length(text))

    def _decode_new(self) -> str:
        """The whole text so far, decoding only the window since the last settled step."""
        window = self._decode(self.token_ids[self._prefix_offset:])
        if not window.startswith(self._prefix_text):  # the tokenizer rewrote earlier text: start over
            self._prefix_offset = self._read_offset = 0
            self._settled = self._prefix_text = ""
            window = self._decode(self.token_ids)
        tail = window[len(self._prefix_text):]
        text = self._settled + tail
        if tail and not tail.endswith("\ufffd"):  # complete characters: settle them
            self._settled = text
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            self._prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def flush(self) -> str:
        """Everything not yet emitted (call once the request has finished)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars:upto]
        self.num_emitted_chars = upto
        return delta

    def _first_stop(self, text: str) -> int | None:
        # Only the region new text can complete is searched.
        start = max(0, self.num_emitted_chars - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _stable_length(self, text: str) -> int:
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            end -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text.endswith(s[:k], 0, end):
                    end -= k
                    break
        return max(end, self.num_emitted_chars)
