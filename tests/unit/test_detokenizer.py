"""Incremental detokenization: deltas concatenate to the text, stop strings are cut and never leak."""

from __future__ import annotations

import random
from typing import ClassVar

import pytest

from prad.detokenizer import Detokenizer

EOS = 99


class ByteTokenizer:
    """A byte-level tokenizer stand-in: each id is some bytes; decode joins them as UTF-8 with replacement.

    Like a real byte-level BPE tokenizer, a token may end in the middle of a multi-byte character, which
    then decodes to '\ufffd' until a later token brings the rest of its bytes.
    """

    VOCAB: ClassVar[dict[int, bytes]] = {
        0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: b"\xc3", 5: b"\xa9", 6: b"!", 7: b" ST", 8: b"OP",
        9: b"S", 10: b"TOP", 11: b"a", 12: b"b", 13: b"\n", 14: b"\xe2\x82", 15: b"\xac", 16: b"x", 17: b"ab",
        EOS: b"<eos>",
    }
    SPECIAL = frozenset({EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and i in self.SPECIAL))
        return data.decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def _run(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[Detokenizer, list[str]]:
    """Feed ids until a stop is found (as the engine does); return the detokenizer and all deltas."""
    detok = Detokenizer(TOK, stop)
    deltas: list[str] = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        if detok.is_stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


def test_deltas_concatenate_to_text_without_stops() -> None:
    ids = [0, 1, 2, 3, 6]
    detok, deltas = _run(ids)
    assert deltas == ["Hel", "lo", " wor", "ld", "!", ""]
    assert detok.text == "Hello world!" == TOK.decode(ids)
    assert "".join(deltas) == detok.text
    assert not detok.is_stopped
    assert detok.token_ids == ids


def test_incomplete_character_is_held_until_completed() -> None:
    detok = Detokenizer(TOK)
    assert detok.add(16) == "x"
    assert detok.add(4) == ""  # b"\xc3": half of 'é'
    assert detok.text == "x\ufffd"
    assert detok.add(5) == "é"  # b"\xa9" completes it
    assert detok.text == "xé"
    # A three-byte character split 2 + 1.
    assert detok.add(14) == ""
    assert detok.text.endswith("\ufffd")
    assert detok.add(15) == "€"
    assert detok.flush() == ""
    assert detok.text == "xé€"


def test_flush_releases_an_unfinished_character() -> None:
    detok, deltas = _run([16, 4])
    assert deltas == ["x", "", "\ufffd"]
    assert "".join(deltas) == detok.text == "x\ufffd"


def test_special_tokens_are_skipped() -> None:
    detok, deltas = _run([11, EOS, 12])
    assert "".join(deltas) == detok.text == "ab"


def test_stop_string_is_excluded_and_sets_is_stopped() -> None:
    detok = Detokenizer(TOK, ("!",))
    assert detok.add(0) == "Hel"
    assert detok.add(1) == "lo"
    assert not detok.is_stopped
    assert detok.add(6) == ""
    assert detok.is_stopped
    assert detok.text == "Hello"
    assert detok.flush() == ""


def test_stop_inside_a_token_cuts_text_after_it_too() -> None:
    # b"ab" with stop "a": the stop and everything after it are dropped.
    detok, deltas = _run([16, 17, 16], stop=("a",))
    assert detok.is_stopped
    assert detok.text == "x"
    assert "".join(deltas) == "x"


def test_possible_stop_prefix_is_held_back_and_released() -> None:
    detok = Detokenizer(TOK, ("ab!",))
    assert detok.add(16) == "x"
    assert detok.add(11) == ""  # "a" could start "ab!"
    assert detok.add(12) == ""  # "ab" still could
    assert detok.add(16) == "abx"  # "abx" cannot: released all at once
    assert not detok.is_stopped
    assert detok.flush() == ""
    assert detok.text == "xabx"


def test_held_back_prefix_is_released_by_flush() -> None:
    detok, deltas = _run([0, 1, 7], stop=(" STOP",))
    assert deltas == ["Hel", "lo", "", " ST"]
    assert not detok.is_stopped
    assert "".join(deltas) == detok.text == "Hello ST"


def test_stop_string_spanning_two_tokens_is_caught() -> None:
    detok = Detokenizer(TOK, (" STOP",))
    assert detok.add(0) == "Hel"
    assert detok.add(1) == "lo"
    assert detok.add(7) == ""  # " ST" held back
    assert detok.add(8) == ""  # "OP" completes " STOP"
    assert detok.is_stopped
    assert detok.text == "Hello"
    assert detok.flush() == ""


def test_stop_string_spanning_three_tokens_is_caught() -> None:
    detok, deltas = _run([16, 9, 10, 16], stop=("xSTOP",))
    # "x", "S", "TOP": the stop starts in the very first token.
    assert detok.is_stopped
    assert detok.text == ""
    assert deltas == ["", "", "", ""]


def test_earliest_of_several_stop_strings_wins() -> None:
    detok, deltas = _run([11, 13, 12, 7, 8], stop=(" STOP", "\n"))
    assert detok.is_stopped
    assert detok.text == "a"
    assert "".join(deltas) == "a"


def test_stop_after_incomplete_character() -> None:
    detok, deltas = _run([4, 5, 6, 16], stop=("é!",))
    assert detok.is_stopped
    assert detok.text == ""
    assert "".join(deltas) == ""


def _expected_text(ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
    text = TOK.decode(ids)
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


@pytest.mark.parametrize("stop", [(), ("!",), (" STOP",), ("ab", "bab"), ("aab",), ("é!", "\n"), ("€x", "lo w")])
def test_random_streams_keep_the_invariants(stop: tuple[str, ...]) -> None:
    rng = random.Random(1234)
    vocab = sorted(ByteTokenizer.VOCAB)
    num_stopped = 0
    for _ in range(300):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 12))]
        detok, deltas = _run(ids, stop)
        fed = detok.token_ids
        expected, stopped = _expected_text(fed, stop)
        assert "".join(deltas) == detok.text, (fed, deltas)
        assert detok.text == expected, fed
        assert detok.is_stopped == stopped, fed
        num_stopped += stopped
        assert not any(s in detok.text for s in stop), fed
        # Every emitted prefix is a prefix of the final text (nothing emitted is ever taken back).
        emitted = ""
        for delta in deltas:
            emitted += delta
            assert detok.text.startswith(emitted)
    assert (num_stopped > 0) == bool(stop)  # the streams really exercise stopping


class CountingTokenizer(ByteTokenizer):
    """Records how many ids each decode call was given."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_a_token_costs_the_same_late_in_a_long_output() -> None:
    tok = CountingTokenizer()
    detok = Detokenizer(tok, ("STOP!",))
    rng = random.Random(7)
    ids = [rng.choice([0, 1, 2, 3, 11, 12, 13, 16, 17]) for _ in range(600)] + [4, 5, 14, 15]
    for token_id in ids:
        detok.add(token_id)
    detok.flush()
    assert max(tok.sizes) <= 4  # windows, never the whole output
    assert detok.text == TOK.decode(ids)


def test_windows_give_the_full_decode_on_random_byte_streams() -> None:
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.choice(list(ByteTokenizer.VOCAB)) for _ in range(rng.randint(1, 40))]
        detok, deltas = _run(ids)
        assert "".join(deltas) == detok.text == TOK.decode(ids), ids
