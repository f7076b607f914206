"""Windowed incremental detokenization gives exactly the full decode with the real SmolLM2 tokenizer,
multi-byte characters split across tokens included (prad/detokenizer.py)."""

from __future__ import annotations

import random

from prad.detokenizer import Detokenizer

TEXTS = ["Hello, world! Ça va? 你好，世界。 Emoji: 🙂🚀 and café au lait.",
         "  leading spaces\tand tabs\nnew lines\n\n  indented",
         "Numbers 12345 67890 and symbols €£¥ ← → ∑ ∫ √"]


def test_streamed_text_equals_the_full_decode(smollm2) -> None:
    tok = smollm2.tokenizer
    rng = random.Random(0)
    samples = [tok(text).input_ids for text in TEXTS]
    samples += [[rng.randrange(tok.vocab_size) for _ in range(200)] for _ in range(20)]  # arbitrary bytes
    for ids in samples:
        detok = Detokenizer(tok)
        streamed = "".join(detok.add(t) for t in ids) + detok.flush()
        assert streamed == detok.text == tok.decode(ids, skip_special_tokens=True), ids[:20]
