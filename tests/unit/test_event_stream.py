"""A request's output stream at the front door: events the engine sent while the consumer was busy
come out as one chunk; a consumer that keeps up sees every event on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from kv_transfer.base import EventSink, TokenEvent, merge_events
from kv_transfer.outcome import ErrorKind
from prad.sampling import SamplingParams
from prefill_service.engine import PrefillRequest
from prefill_service.service import PrefillService, ServiceError, collect
from serving.metrics import Metrics


def _ev(index: int, token: int, final: str | None = None) -> TokenEvent:
    return TokenEvent("r", [token], f"<{token}>", finish_reason=final, num_output_tokens=index + 1,
                      first_token_index=index)


def test_merge_keeps_order_and_takes_the_finish_fields_from_the_last() -> None:
    merged = merge_events([_ev(3, 13), _ev(4, 14), _ev(5, 15, "length")])
    assert merged.token_ids == [13, 14, 15] and merged.text == "<13><14><15>"
    assert merged.first_token_index == 3 and merged.finish_reason == "length" and merged.num_output_tokens == 6
    one = _ev(0, 1)
    assert merge_events([one]) is one


class _Engine:
    """Stands in for PrefillEngine: keeps the request's sink so the test plays the decode side."""

    def __init__(self) -> None:
        self.sink: EventSink | None = None
        self.aborted: list[str] = []

    def submit(self, request: PrefillRequest, sink: EventSink) -> None:
        self.sink = sink

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _service(engine: _Engine) -> PrefillService:
    loaded: Any = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    return PrefillService(loaded, adapters=None, engine=engine, max_seq_len=512,  # type: ignore[arg-type]
                          request_timeout_s=30.0, metrics=Metrics())


def _request() -> PrefillRequest:
    return PrefillRequest("r", "base", [1, 2, 3], adapter=None, adapter_version="base",
                          sampling=SamplingParams(max_new_tokens=4), arrived_s=0.0)


def test_events_sent_while_the_consumer_was_away_arrive_as_one_chunk() -> None:
    async def run() -> list[TokenEvent]:
        engine = _Engine()
        stream = _service(engine).submit(_request())
        assert engine.sink is not None
        for i in range(3):
            engine.sink(_ev(i, 10 + i))
        engine.sink(_ev(3, 13, "length"))
        await asyncio.sleep(0)  # the thread-safe puts land in the queue
        return [event async for event in stream]

    chunks = asyncio.run(run())
    assert len(chunks) == 1
    assert chunks[0].token_ids == [10, 11, 12, 13] and chunks[0].finish_reason == "length"


def test_a_consumer_that_keeps_up_gets_one_event_per_token() -> None:
    async def run() -> list[TokenEvent]:
        engine = _Engine()
        stream = _service(engine).submit(_request())
        assert engine.sink is not None
        chunks = []
        for i in range(4):
            engine.sink(_ev(i, 10 + i, "length" if i == 3 else None))
            chunks.append(await anext(stream))
        return chunks

    chunks = asyncio.run(run())
    assert [c.token_ids for c in chunks] == [[10], [11], [12], [13]]
    assert chunks[-1].is_final


def test_a_consumer_that_leaves_aborts_the_request() -> None:
    async def run() -> _Engine:
        engine = _Engine()
        stream = _service(engine).submit(_request())
        assert engine.sink is not None
        engine.sink(_ev(0, 10))
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        return engine

    assert asyncio.run(run()).aborted == ["r"]


def test_collect_merges_the_whole_output_and_raises_on_a_failed_request() -> None:
    async def events(*items: TokenEvent) -> AsyncIterator[TokenEvent]:
        for item in items:
            yield item

    result = asyncio.run(collect(events(_ev(0, 10), _ev(1, 11), _ev(2, 12, "length"))))
    assert result.token_ids == [10, 11, 12] and result.text == "<10><11><12>" and result.finish_reason == "length"
    failed = TokenEvent.failure("r", ErrorKind.UNAVAILABLE, "decode service gone")
    with pytest.raises(ServiceError) as info:
        asyncio.run(collect(events(_ev(0, 10), failed)))
    assert info.value.kind is ErrorKind.UNAVAILABLE and "decode service gone" in info.value.message
