"""At-least-once delivery: a replayed request's tokens reach the client exactly once."""

from __future__ import annotations

from kv_transfer.base import DedupSink, TokenEvent


def _ev(index: int, token: int, final: str | None = None) -> TokenEvent:
    return TokenEvent("r", [token], f"<{token}>", finish_reason=final, first_token_index=index)


def test_replay_after_takeover_delivers_each_token_once() -> None:
    seen: list[TokenEvent] = []
    sink = DedupSink(seen.append)
    for i in range(3):  # replica A: tokens 0..2, then dies
        sink(_ev(i, 10 + i))
    for i in range(5):  # replica B replays from the start and finishes
        sink(_ev(i, 10 + i, "length" if i == 4 else None))
    assert [t for e in seen for t in e.token_ids] == [10, 11, 12, 13, 14]
    assert "".join(e.text for e in seen) == "<10><11><12><13><14>"
    assert seen[-1].finish_reason == "length"


def test_nothing_after_the_final_event() -> None:
    seen: list[TokenEvent] = []
    sink = DedupSink(seen.append)
    sink(_ev(0, 1, "stop"))
    sink(_ev(0, 1, "stop"))  # the same final again from a replay
    sink(TokenEvent("r", [], "", finish_reason="error", error="late"))
    assert len(seen) == 1 and seen[0].finish_reason == "stop"


def test_final_event_of_a_replay_is_delivered_even_if_its_token_was_seen() -> None:
    seen: list[TokenEvent] = []
    sink = DedupSink(seen.append)
    sink(_ev(0, 1))
    sink(_ev(1, 2))
    sink(TokenEvent("r", [2], "", finish_reason="abort", first_token_index=1))
    assert [t for e in seen for t in e.token_ids] == [1, 2]
    assert seen[-1].finish_reason == "abort"
