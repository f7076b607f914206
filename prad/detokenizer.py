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
    tokenizer: Any  # a transformers tokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    num_emitted_chars: int = 0
    is_stopped: bool = False  # a stop string was found
    text: str = ""  # the text so far (cut before a stop string once found)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly stable text (may be empty)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.is_stopped = True
            self.text = text[:cut]
            return self._emit(len(self.text))
        self.text = text
        return self._emit(self._stable_length(text))

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
                if text[:end].endswith(s[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return max(end, self.num_emitted_chars)
