"""Layer-wise KV streaming (handoff format version 4): decode gets each layer while prefill computes the
next, and admits the request only after the trailer; tokens equal the whole handoff's, failures lose
nothing and leave nothing behind."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from decode_service.engine import DecodeConfig, DecodeEngine
from kv_transfer.base import KVSender, KVStream, TokenEvent
from kv_transfer.grpc_client import GrpcSender
from kv_transfer.grpc_server import DecodeServicer, GrpcDecodeServer
from kv_transfer.handoff import KVHandoff, KVLayout
from kv_transfer.inproc import InprocSender
from kv_transfer.outcome import ErrorKind
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.wire import KV_WIRE_FORMATS, KVLimits
from prad.sampling import SamplingParams
from prefill_service.engine import PrefillConfig, PrefillEngine, PrefillRequest
from prefill_service.runner import ChunkInput, PrefillRunner

PROMPT = "Layer by layer, the key and value tensors of a long prompt travel to decode while prefill works on"


@pytest.fixture(scope="module")
def engine(smollm2) -> Iterator[DecodeEngine]:
    e = DecodeEngine(smollm2, DecodeConfig(max_batch_size=4, max_seq_len=128, max_kv_tokens=512, max_waiting=8))
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def grpc_address(engine: DecodeEngine) -> Iterator[str]:
    limits = KVLimits(engine.expected_layout, engine.config.max_seq_len)
    server = GrpcDecodeServer(DecodeServicer(engine, lambda: pb.HealthReply(), None, limits), "127.0.0.1", 0)
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture(scope="module")
def grpc_sender(grpc_address: str) -> Iterator[GrpcSender]:
    sender = GrpcSender(grpc_address, timeout_s=30)
    yield sender
    sender.close()


def _prefilled(smollm2, request_id: str, prompt: str = PROMPT) -> KVHandoff:
    ids = smollm2.tokenizer(prompt).input_ids
    out = PrefillRunner(smollm2.model).run([ChunkInput(ids, 0, None, None)])[0]
    c = smollm2.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", len(ids))
    return KVHandoff(request_id, "base", "base", smollm2.fingerprint, ids, int(out.logits.argmax()),
                     SamplingParams(max_new_tokens=6), None, layout, out.kv)


class Events:
    def __init__(self) -> None:
        self.queue: queue.Queue[TokenEvent] = queue.Queue()

    def __call__(self, event: TokenEvent) -> None:
        self.queue.put(event)

    def until_final(self, timeout_s: float = 60) -> list[TokenEvent]:
        got: list[TokenEvent] = []
        deadline = time.time() + timeout_s
        while not got or not got[-1].is_final:
            got.append(self.queue.get(timeout=max(0.1, deadline - time.time())))
        return got

    def none_within(self, seconds: float) -> bool:
        try:
            self.queue.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def _stream_layers(stream: KVStream, source: torch.Tensor, layers: range, pause_s: float = 0.0) -> None:
    """Fill the stream's KV from `source` layer by layer, as prefill's pass does."""
    for layer in layers:
        stream.handoff.kv[layer] = source[layer]
        stream.layer_ready(layer)
        if pause_s:
            time.sleep(pause_s)


def _open(sender: KVSender, whole: KVHandoff, sink: Events) -> KVStream:
    blank = KVHandoff(**{**whole.__dict__, "first_token_id": 0, "kv": torch.full_like(whole.kv, float("nan"))})
    stream = sender.open_stream(blank, sink)
    assert stream is not None
    return stream


def _refused_at_the_header(sender: KVSender, engine: DecodeEngine, smollm2, request_id: str) -> None:
    """Stream a KV longer than decode's max_seq_len: refused at its header, once; the layers and trailer sent
    after the refusal bring no further event."""
    c = smollm2.config
    length = engine.config.max_seq_len + 10
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", length)
    handoff = KVHandoff(request_id, "base", "base", smollm2.fingerprint, [1] * length, 0, SamplingParams(4),
                        None, layout, torch.zeros(layout.shape))
    got = Events()
    stream = sender.open_stream(handoff, got)
    assert stream is not None
    final = got.until_final()[-1]
    assert final.error_kind is ErrorKind.KV_REJECTED and "max_seq_len" in (final.error or "")
    _stream_layers(stream, handoff.kv, range(c.num_layers))
    stream.finish(2)
    assert got.none_within(0.5)


def _idle(engine: DecodeEngine, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("kv_wire_format", KV_WIRE_FORMATS)
def test_grpc_streamed_handoff_decodes_like_the_whole_one(grpc_address: str, engine: DecodeEngine, smollm2,
                                                          kv_wire_format: str) -> None:
    whole = _prefilled(smollm2, f"whole-{kv_wire_format}")
    expected = Events()
    InprocSender(engine).send(whole, expected)
    expected_tokens = _tokens(expected.until_final())
    sender = GrpcSender(grpc_address, timeout_s=30, kv_wire_format=kv_wire_format)
    try:
        got = Events()
        whole.request_id = f"streamed-{kv_wire_format}"
        stream = _open(sender, whole, got)
        _stream_layers(stream, whole.kv, range(whole.layout.num_layers), pause_s=0.005)
        assert got.none_within(0.3)  # nothing is admitted before the trailer
        stream.finish(whole.first_token_id)
        events = got.until_final()
    finally:
        sender.close()
    assert events[-1].finish_reason == "length" and len(_tokens(events)) == 6
    assert _tokens(events)[0] == expected_tokens[0]
    if kv_wire_format == "native":
        assert _tokens(events) == expected_tokens


def test_grpc_cancelled_stream_leaves_nothing_and_the_request_can_be_sent_again(
        grpc_sender: GrpcSender, engine: DecodeEngine, smollm2) -> None:
    whole = _prefilled(smollm2, "cancel-1")
    got = Events()
    stream = _open(grpc_sender, whole, got)
    _stream_layers(stream, whole.kv, range(5))
    stream.cancel("prefill pass failed")
    assert got.none_within(0.5)  # a cancelled stream says nothing: prefill retries the request
    assert _idle(engine)
    again = Events()
    grpc_sender.send(whole, again)
    assert again.until_final()[-1].finish_reason == "length"


def test_grpc_stream_refused_at_the_header_reports_once(grpc_sender: GrpcSender, engine: DecodeEngine,
                                                       smollm2) -> None:
    """A header over decode's limits is refused before any layer; later layers and finish change nothing."""
    _refused_at_the_header(grpc_sender, engine, smollm2, "too-long-1")
    assert _idle(engine)


def test_grpc_stream_with_a_corrupted_layer_is_refused_by_checksum(grpc_sender: GrpcSender, engine: DecodeEngine,
                                                                   smollm2, monkeypatch) -> None:
    import kv_transfer.grpc_client as client

    pieces = client.chunks
    calls = {"n": 0}

    def corrupt(data: bytes) -> list[bytes]:  # after the checksum, as a bad link would
        calls["n"] += 1
        if calls["n"] != 4:
            return pieces(data)
        flipped = bytearray(data)
        flipped[len(flipped) // 3] ^= 0x40
        return [bytes(flipped)]

    monkeypatch.setattr(client, "chunks", corrupt)
    whole = _prefilled(smollm2, "crc-stream-1")
    got = Events()
    stream = _open(grpc_sender, whole, got)
    _stream_layers(stream, whole.kv, range(whole.layout.num_layers))
    stream.finish(whole.first_token_id)
    final = got.until_final()[-1]
    assert final.error_kind is ErrorKind.KV_REJECTED and "checksum mismatch" in (final.error or "")
    assert _idle(engine)


def _run_prefill(loaded, sender: KVSender, requests: list[tuple[str, list[int]]], stream_kv: bool = True,
                 before: Callable[[PrefillEngine], None] | None = None) -> dict[str, list[TokenEvent]]:
    """Prefill `requests` (id, prompt ids) through a real PrefillEngine with `sender`; all their events."""
    prefill = PrefillEngine(loaded, sender, PrefillConfig(max_prefill_tokens=4096, stream_kv=stream_kv,
                                                                stream_kv_min_tokens=0))
    if before is not None:
        before(prefill)
    sinks = {rid: Events() for rid, _ in requests}
    prefill.start()
    try:
        for rid, ids in requests:
            prefill.submit(PrefillRequest(request_id=rid, task="base", prompt_token_ids=ids, adapter=None,
                                          adapter_version="base", sampling=SamplingParams(max_new_tokens=6),
                                          arrived_s=time.monotonic()), sinks[rid])
        return {rid: sink.until_final() for rid, sink in sinks.items()}
    finally:
        prefill.stop()


def _prompts(smollm2, tag: str) -> list[tuple[str, list[int]]]:
    texts = [PROMPT, "A short one.", "Streaming overlaps the transfer with the compute of later layers."]
    return [(f"{tag}-{i}", smollm2.tokenizer(t).input_ids) for i, t in enumerate(texts)]


def test_prefill_engine_streams_over_grpc_with_the_tokens_of_inproc(grpc_sender: GrpcSender, engine: DecodeEngine,
                                                                    smollm2, monkeypatch) -> None:
    import kv_transfer.grpc_client as client

    versions: list[bool] = []
    header_to_proto = client.header_to_proto

    def spy(*args, **kwargs):
        versions.append(bool(kwargs.get("streamed")))
        return header_to_proto(*args, **kwargs)

    monkeypatch.setattr(client, "header_to_proto", spy)
    inproc = _run_prefill(smollm2, InprocSender(engine), _prompts(smollm2, "inproc"))
    streamed = _run_prefill(smollm2, grpc_sender, _prompts(smollm2, "grpc"))
    assert versions == [True, True, True]  # each handoff went as version 4
    whole = _run_prefill(smollm2, grpc_sender, _prompts(smollm2, "whole"), stream_kv=False)
    assert len(versions) == 3  # the whole handoffs are built by encode_handoff, not streamed
    for i in range(3):
        expected = _tokens(inproc[f"inproc-{i}"])
        assert len(expected) == 6
        assert _tokens(streamed[f"grpc-{i}"]) == expected
        assert _tokens(whole[f"whole-{i}"]) == expected


def test_a_pass_failing_mid_stream_is_retried_whole_and_loses_nothing(grpc_sender: GrpcSender,
                                                                      engine: DecodeEngine, smollm2) -> None:
    """The batch's pass fails after some layers were sent: its streams are cancelled, each request is
    retried alone as a whole handoff, and every client gets its full answer exactly once."""
    expected = _run_prefill(smollm2, InprocSender(engine), _prompts(smollm2, "ref"))
    failures = {"left": 1}

    def break_once(prefill: PrefillEngine) -> None:
        run = prefill.runner.run

        def failing_run(chunks, outputs=None, on_layer=None):
            def layer_done(layer: int) -> None:
                if on_layer is not None:
                    on_layer(layer)
                if layer == 7 and failures["left"] and len(chunks) > 1:
                    failures["left"] -= 1
                    raise RuntimeError("injected failure after layer 7")

            return run(chunks, outputs, layer_done)

        prefill.runner.run = failing_run  # type: ignore[method-assign]

    got = _run_prefill(smollm2, grpc_sender, _prompts(smollm2, "retry"), before=break_once)
    assert failures["left"] == 0
    for i in range(3):
        events = got[f"retry-{i}"]
        assert [e.is_final for e in events].count(True) == 1
        assert _tokens(events) == _tokens(expected[f"ref-{i}"])
    assert _idle(engine)


def test_stream_errors_on_open_fall_back_to_the_whole_handoff(engine: DecodeEngine, smollm2) -> None:
    class NoStream(InprocSender):
        def open_stream(self, handoff: KVHandoff, sink) -> KVStream | None:
            raise ConnectionError("cannot open")

    got = _run_prefill(smollm2, NoStream(engine), _prompts(smollm2, "fallback"))
    assert all(events[-1].finish_reason == "length" for events in got.values())


# --- Redis ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    from tests.redis_fixture import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture()
def redis_pair(engine: DecodeEngine, redis_url: str, request) -> Iterator[tuple[object, object]]:
    """A decode worker and a sender on a prefix of their own (claim_idle_s 1: takeovers come fast)."""
    from kv_transfer.redis_sender import RedisSender
    from kv_transfer.redis_worker import RedisDecodeWorker

    prefix = f"{request.node.name[:40]}:"
    worker = RedisDecodeWorker(engine, redis_url, prefix, "replica-a", claim_idle_s=1,
                               limits=KVLimits(engine.expected_layout, engine.config.max_seq_len))
    worker.start()
    sender = RedisSender(redis_url, prefix, timeout_s=30, claim_idle_s=1)
    deadline = time.time() + 10
    while not sender.is_ready()[0]:
        assert time.time() < deadline, "no decode replica became alive"
        time.sleep(0.05)
    yield worker, sender
    sender.close()
    worker.stop()


def _request_keys(redis_url: str, prefix: str, rid: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [k for k in client.keys(f"{prefix}*{rid}*")]
    finally:
        client.close()


@pytest.mark.parametrize("kv_wire_format", KV_WIRE_FORMATS)
def test_redis_streamed_handoff_decodes_like_the_whole_one(engine: DecodeEngine, redis_pair, smollm2,
                                                           kv_wire_format: str) -> None:
    _, sender = redis_pair
    sender.kv_wire_format = kv_wire_format
    whole = _prefilled(smollm2, f"r-whole-{kv_wire_format}")
    expected = Events()
    InprocSender(engine).send(whole, expected)
    expected_tokens = _tokens(expected.until_final())
    whole.request_id = f"r-streamed-{kv_wire_format}"
    got = Events()
    stream = _open(sender, whole, got)
    _stream_layers(stream, whole.kv, range(whole.layout.num_layers), pause_s=0.005)
    assert got.none_within(0.3)  # nothing is admitted before the trailer
    stream.finish(whole.first_token_id)
    events = got.until_final()
    assert events[-1].finish_reason == "length" and len(_tokens(events)) == 6
    assert _tokens(events)[0] == expected_tokens[0]
    if kv_wire_format == "native":
        assert _tokens(events) == expected_tokens
    deadline = time.time() + 5
    while _request_keys(sender.url, sender.keys.prefix, whole.request_id) and time.time() < deadline:
        time.sleep(0.05)
    assert _request_keys(sender.url, sender.keys.prefix, whole.request_id) == []  # KV, layers, tokens: gone


def test_redis_cancelled_stream_leaves_nothing_and_the_request_can_be_sent_again(
        engine: DecodeEngine, redis_pair, smollm2) -> None:
    worker, sender = redis_pair
    whole = _prefilled(smollm2, "r-cancel-1")
    got = Events()
    stream = _open(sender, whole, got)
    _stream_layers(stream, whole.kv, range(5))
    stream.cancel("prefill pass failed")
    assert got.none_within(0.5)
    deadline = time.time() + 5
    while (worker._assembling or _request_keys(sender.url, sender.keys.prefix, "r-cancel-1")) and \
            time.time() < deadline:
        time.sleep(0.05)
    assert not worker._assembling and _request_keys(sender.url, sender.keys.prefix, "r-cancel-1") == []
    again = Events()
    sender.send(whole, again)
    assert again.until_final()[-1].finish_reason == "length"
    assert _idle(engine)


def test_redis_stream_refused_at_the_header_stops_writing_its_layers(engine: DecodeEngine, redis_pair,
                                                                     smollm2) -> None:
    """Once decode refuses the header, the layers that follow are not written: no key outlives the request."""
    _, sender = redis_pair
    _refused_at_the_header(sender, engine, smollm2, "r-too-long-1")
    deadline = time.time() + 10
    while not sender._outbox.empty() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the writer thread's last item
    assert _request_keys(sender.url, sender.keys.prefix, "r-too-long-1") == []
    assert _idle(engine)


def test_redis_stream_that_stops_is_refused(engine: DecodeEngine, redis_pair, smollm2, monkeypatch) -> None:
    import kv_transfer.redis_worker as rworker

    monkeypatch.setattr(rworker, "STREAM_STALL_S", 1.0)
    _, sender = redis_pair
    whole = _prefilled(smollm2, "r-stall-1")
    got = Events()
    stream = _open(sender, whole, got)
    _stream_layers(stream, whole.kv, range(3))  # ... and its prefill goes silent
    final = got.until_final(timeout_s=20)[-1]
    assert final.error_kind is ErrorKind.KV_REJECTED and "KV stream stopped" in (final.error or "")
    assert _idle(engine)


def test_redis_streamed_job_taken_over_mid_stream_replays_its_layers(engine: DecodeEngine, redis_pair, redis_url,
                                                                      smollm2) -> None:
    """The replica assembling a streamed job stops; another takes the job over and reads its layers from
    the start, and the client gets its answer, exactly once."""
    from kv_transfer.redis_worker import RedisDecodeWorker

    first, sender = redis_pair
    whole = _prefilled(smollm2, "r-takeover-1")
    expected = Events()
    InprocSender(engine).send(KVHandoff(**{**whole.__dict__, "request_id": "r-takeover-ref"}), expected)
    got = Events()
    stream = _open(sender, whole, got)
    _stream_layers(stream, whole.kv, range(10))
    deadline = time.time() + 5
    while "r-takeover-1" not in first._assembling and time.time() < deadline:
        time.sleep(0.02)
    assert "r-takeover-1" in first._assembling
    first.stop()  # its pending job stops being heartbeated
    second = RedisDecodeWorker(engine, redis_url, sender.keys.prefix, "replica-b", claim_idle_s=1,
                               limits=KVLimits(engine.expected_layout, engine.config.max_seq_len))
    second.start()
    try:
        _stream_layers(stream, whole.kv, range(10, whole.layout.num_layers))
        stream.finish(whole.first_token_id)
        events = got.until_final(timeout_s=30)
        assert [e.is_final for e in events].count(True) == 1
        assert _tokens(events) == _tokens(expected.until_final())
    finally:
        second.stop()


def test_prefill_engine_streams_over_redis_with_the_tokens_of_inproc(engine: DecodeEngine, redis_pair,
                                                                     smollm2) -> None:
    _, sender = redis_pair
    inproc = _run_prefill(smollm2, InprocSender(engine), _prompts(smollm2, "r-inproc"))
    streamed = _run_prefill(smollm2, sender, _prompts(smollm2, "r-grpc"))
    for i in range(3):
        assert _tokens(streamed[f"r-grpc-{i}"]) == _tokens(inproc[f"r-inproc-{i}"])
