"""The receiver refuses foreign, malformed and corrupted KV with a clear error, over gRPC and Redis."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from decode_service.engine import DecodeConfig, DecodeEngine
from kv_transfer.base import TokenEvent
from kv_transfer.grpc_client import GrpcSender
from kv_transfer.grpc_server import DecodeServicer, GrpcDecodeServer, TLSFiles
from kv_transfer.handoff import KVHandoff, KVLayout
from kv_transfer.outcome import ErrorKind
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.wire import KVLimits
from prad.sampling import SamplingParams
from prefill_service.runner import ChunkInput, PrefillRunner
from tests.redis_fixture import running_redis
from tests.tls import make_tls_files


@pytest.fixture(scope="module")
def engine(smollm2) -> Iterator[DecodeEngine]:
    e = DecodeEngine(smollm2, DecodeConfig(max_batch_size=4, max_seq_len=128, max_kv_tokens=512, max_waiting=4))
    e.start()
    yield e
    e.stop()


def _handoff(smollm2, request_id: str) -> KVHandoff:
    ids = smollm2.tokenizer("The capital of France is").input_ids
    out = PrefillRunner(smollm2.model).run([ChunkInput(ids, 0, None, None)])[0]
    c = smollm2.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", len(ids))
    return KVHandoff(request_id, "base", "base", smollm2.fingerprint, ids, int(out.logits.argmax()),
                     SamplingParams(max_new_tokens=4), None, layout, out.kv)


def _collect(send, handoff: KVHandoff, timeout_s: float = 60) -> list[TokenEvent]:
    events: queue.Queue[TokenEvent] = queue.Queue()
    send(handoff, events.put)
    got = []
    deadline = time.time() + timeout_s
    while not got or not got[-1].is_final:
        got.append(events.get(timeout=max(0.1, deadline - time.time())))
    return got


def _corrupting(monkeypatch) -> None:
    """Flip one KV byte after the checksum is computed, as a bad link would."""
    import kv_transfer.grpc_client as client
    import kv_transfer.redis_sender as rsender
    from kv_transfer.wire import encode_handoff

    def corrupt(handoff: KVHandoff, kv_wire_format: str = "native") -> tuple[bytes, bytes]:
        header, data = encode_handoff(handoff, kv_wire_format)
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0xFF
        return header, bytes(flipped)

    monkeypatch.setattr(client, "encode_handoff", corrupt)
    monkeypatch.setattr(rsender, "encode_handoff", corrupt)


@pytest.fixture(scope="module")
def grpc_sender(engine: DecodeEngine, smollm2) -> Iterator[GrpcSender]:
    server = GrpcDecodeServer(DecodeServicer(engine, lambda: pb.HealthReply(), None), "127.0.0.1", 0)
    server.start()
    sender = GrpcSender(f"127.0.0.1:{server.port}")
    yield sender
    sender.close()
    server.stop()


def test_grpc_good_handoff_is_decoded(grpc_sender: GrpcSender, smollm2) -> None:
    events = _collect(grpc_sender.send, _handoff(smollm2, "ok-1"))
    assert events[-1].finish_reason == "length"
    assert sum(len(e.token_ids) for e in events) == 4


def test_grpc_foreign_fingerprint_refused(grpc_sender: GrpcSender, smollm2) -> None:
    handoff = replace(_handoff(smollm2, "fp-1"), model_fingerprint="someone-elses-model")
    final = _collect(grpc_sender.send, handoff)[-1]
    assert final.finish_reason == "error" and final.error_kind is ErrorKind.KV_REJECTED
    assert "model fingerprint mismatch" in (final.error or "")


def test_grpc_layout_mismatch_refused(grpc_sender: GrpcSender, smollm2) -> None:
    good = _handoff(smollm2, "lay-1")
    bad_layout = replace(good.layout, num_kv_heads=good.layout.num_kv_heads * 2, length=good.layout.length // 2)
    final = _collect(grpc_sender.send, replace(good, layout=bad_layout))[-1]
    assert final.error_kind is ErrorKind.KV_REJECTED and "KV" in (final.error or "")


def test_grpc_corrupted_bytes_refused(grpc_sender: GrpcSender, smollm2, engine: DecodeEngine, monkeypatch) -> None:
    _corrupting(monkeypatch)
    final = _collect(grpc_sender.send, _handoff(smollm2, "crc-1"))[-1]
    assert final.error_kind is ErrorKind.KV_REJECTED and "checksum mismatch" in (final.error or "")
    assert engine.stats()["num_running"] == 0 and engine.stats()["num_waiting"] == 0  # nothing half-admitted


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_grpc_over_tls_decodes_and_refuses_plaintext_or_foreign_ca(grpc_sender: GrpcSender, engine: DecodeEngine,
                                                                    smollm2, tmp_path) -> None:
    files = make_tls_files(tmp_path / "tls")
    other_ca = make_tls_files(tmp_path / "other", ca_name="someone-else").ca
    server = GrpcDecodeServer(DecodeServicer(engine, lambda: pb.HealthReply(), None), "127.0.0.1", 0,
                              TLSFiles(str(files.cert), str(files.key)))
    server.start()
    address = f"127.0.0.1:{server.port}"
    senders = {name: GrpcSender(address, tls=tls, timeout_s=20) for name, tls in
               (("tls", TLSFiles(ca=str(files.ca))), ("plain", None), ("foreign", TLSFiles(ca=str(other_ca))))}
    try:
        assert senders["tls"].is_ready() == (True, "ok")
        over_tls = _collect(senders["tls"].send, _handoff(smollm2, "tls-1"))
        assert over_tls[-1].finish_reason == "length"
        assert _tokens(over_tls) == _tokens(_collect(grpc_sender.send, _handoff(smollm2, "plain-1")))
        for name in ("plain", "foreign"):
            ready, why = senders[name].is_ready()
            assert not ready and address in why
            final = _collect(senders[name].send, _handoff(smollm2, f"{name}-1"), timeout_s=30)[-1]
            assert final.finish_reason == "error" and final.error_kind is ErrorKind.UNAVAILABLE, (name, final)
        assert engine.stats()["num_running"] == 0 and engine.stats()["num_waiting"] == 0
    finally:
        for sender in senders.values():
            sender.close()
        server.stop()


def test_half_configured_tls_is_refused_not_plaintext(tmp_path) -> None:
    from launcher.roles import tls_problem

    assert tls_problem(TLSFiles(cert="c.pem"), "server") and tls_problem(TLSFiles(key="k.pem"), "server")
    assert "--grpc-tls-ca" in (tls_problem(TLSFiles(cert="c.pem", key="k.pem"), "client") or "")
    assert tls_problem(TLSFiles("c.pem", "k.pem"), "server") is None
    assert tls_problem(TLSFiles(ca="ca.pem"), "client") is None and tls_problem(TLSFiles(), "client") is None
    with pytest.raises(ValueError, match="certificate and its private key"):
        GrpcDecodeServer(DecodeServicer(None, lambda: pb.HealthReply(), None), "127.0.0.1", 0,  # type: ignore[arg-type]
                         TLSFiles(cert="c.pem")).start()


def test_redis_corrupted_and_foreign_refused_and_nothing_left(engine: DecodeEngine, smollm2, tmp_path,
                                                               monkeypatch) -> None:
    import redis

    from kv_transfer.redis_sender import RedisSender
    from kv_transfer.redis_worker import RedisDecodeWorker

    with running_redis(tmp_path / "redis") as rs:
        worker = RedisDecodeWorker(engine, rs.url, "t:", "replica-a", claim_idle_s=2)
        worker.start()
        sender = RedisSender(rs.url, "t:")
        try:
            assert _wait_ready(sender)  # the replica's first heartbeat: until then requests are refused
            assert _collect(sender.send, _handoff(smollm2, "r-ok"))[-1].finish_reason == "length"
            foreign = replace(_handoff(smollm2, "r-fp"), model_fingerprint="other")
            final = _collect(sender.send, foreign)[-1]
            assert final.error_kind is ErrorKind.KV_REJECTED and "model fingerprint mismatch" in (final.error or "")
            _corrupting(monkeypatch)
            final = _collect(sender.send, _handoff(smollm2, "r-crc"))[-1]
            assert final.error_kind is ErrorKind.KV_REJECTED and "checksum mismatch" in (final.error or "")
            time.sleep(0.5)
            keys = sorted(k.decode() for k in redis.Redis.from_url(rs.url).keys("t:*"))
            assert [k for k in keys if not k.startswith(("t:jobs", "t:wake:", "t:decode-alive:"))] == []
        finally:
            sender.close()
            worker.stop()


def test_wire_roundtrip_fp32_and_bf16() -> None:
    from kv_transfer.handoff import HandoffError
    from kv_transfer.wire import handoff_from_proto, header_to_proto, kv_checksum, kv_to_bytes, parse_header

    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        kv = torch.randn(2, 2, 3, 5, 4).to(dtype)
        layout = KVLayout(2, 3, 4, name, 5)
        h = KVHandoff("r", "t", "v", "fp", [1, 2, 3, 4, 5], 9, SamplingParams(7, 0.5, 0.9, 3, 11, ("x",), True),
                      123.0, layout, kv)
        data = kv_to_bytes(kv)
        header = parse_header(header_to_proto(h, len(data), kv_checksum(data)).SerializeToString())
        back = handoff_from_proto(header, data)
        halves = kv_checksum(data[len(data) // 2:], kv_checksum(data[:len(data) // 2]))
        assert torch.equal(handoff_from_proto(header, bytearray(data), halves).kv, kv)  # checked while receiving
        with pytest.raises(HandoffError, match="checksum mismatch"):
            handoff_from_proto(header, data[:-1] + bytes([data[-1] ^ 1]))
        assert torch.equal(back.kv, kv) and back.kv.dtype == dtype
        assert back.sampling == h.sampling and back.prompt_token_ids == h.prompt_token_ids
        assert back.deadline_s == 123.0 and back.first_token_id == 9


def test_lossy_wire_formats_decode_over_grpc_and_redis_and_native_stays_exact(
        grpc_sender: GrpcSender, engine: DecodeEngine, smollm2, tmp_path, monkeypatch) -> None:
    """Each sender's kv_wire_format is what travels (a spy on the encoder); decode rebuilds fp32 KV and
    answers; native tokens equal the in-process handoff's (lossy ones: the bench measures agreement)."""
    import kv_transfer.wire as wire
    from kv_transfer.inproc import InprocSender
    from kv_transfer.redis_sender import RedisSender
    from kv_transfer.redis_worker import RedisDecodeWorker

    sent: list[str] = []
    encode = wire.encode_kv
    monkeypatch.setattr(wire, "encode_kv", lambda kv, encoding="": sent.append(encoding) or encode(kv, encoding))
    expected = _tokens(_collect(InprocSender(engine).send, _handoff(smollm2, "wf-inproc")))
    with running_redis(tmp_path / "redis") as rs:
        worker = RedisDecodeWorker(engine, rs.url, "w:", "replica-w", claim_idle_s=2, limits=_limits(engine))
        worker.start()
        senders: dict[tuple[str, str], GrpcSender | RedisSender] = {}
        try:
            for fmt in wire.KV_WIRE_FORMATS:
                senders["grpc", fmt] = GrpcSender(grpc_sender.address, timeout_s=30, kv_wire_format=fmt)
                senders["redis", fmt] = RedisSender(rs.url, "w:", kv_wire_format=fmt)
            assert _wait_ready(senders["redis", "native"])
            for (transport, fmt), sender in senders.items():
                sent.clear()
                events = _collect(sender.send, _handoff(smollm2, f"wf-{transport}-{fmt}"))
                assert sent == ["" if fmt == "native" else fmt], (transport, fmt)
                assert events[-1].finish_reason == "length" and len(_tokens(events)) == 4, (transport, fmt, events)
                assert _tokens(events)[0] == expected[0]  # sampled at prefill, before any transfer
                if fmt == "native":
                    assert _tokens(events) == expected, transport
        finally:
            closing = [threading.Thread(target=sender.close) for sender in senders.values()]  # ~1 s each
            for thread in closing:
                thread.start()
            for thread in closing:
                thread.join()
            worker.stop()


def _limits(engine: DecodeEngine) -> KVLimits:
    return KVLimits(engine.expected_layout, engine.config.max_seq_len)


def _oversized(smollm2, request_id: str, length: int = 200) -> KVHandoff:
    """A well-formed handoff whose prompt is longer than the test engine's max_seq_len (128)."""
    c = smollm2.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", length)
    return KVHandoff(request_id, "base", "base", smollm2.fingerprint, [1] * length, 2, SamplingParams(4), None,
                     layout, torch.zeros(layout.shape))


def test_grpc_header_over_decode_limits_refused_before_any_kv_is_read(engine: DecodeEngine, smollm2) -> None:
    import asyncio

    import grpc

    from kv_transfer.protos import kv_handoff_pb2_grpc as pb_grpc
    from kv_transfer.wire import encode_handoff

    server = GrpcDecodeServer(DecodeServicer(engine, lambda: pb.HealthReply(), None, _limits(engine)), "127.0.0.1", 0)
    server.start()
    sender = GrpcSender(f"127.0.0.1:{server.port}", timeout_s=20)
    try:
        final = _collect(sender.send, _oversized(smollm2, "long-1"))[-1]
        assert final.error_kind is ErrorKind.KV_REJECTED and "max_seq_len is 128" in (final.error or ""), final

        async def announce_only(header: pb.HandoffHeader) -> pb.TokenEvent:
            # The header alone, never a KV chunk: the refusal must come without waiting for any.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = pb_grpc.DecodeServiceStub(channel).Decode(timeout=10)
                await call.write(pb.DecodeRequest(header=header))
                return await call.read()

        header = pb.HandoffHeader.FromString(encode_handoff(_handoff(smollm2, "huge-1"))[0])
        header.num_kv_bytes = 1 << 40
        reply = asyncio.run(announce_only(header))
        assert reply.error_kind == "kv_rejected" and "announces 1099511627776 KV bytes" in reply.error
        header.layout.num_layers = 10_000
        reply = asyncio.run(announce_only(header))
        assert reply.error_kind == "kv_rejected" and "num_layers=10000" in reply.error
        assert engine.stats()["num_running"] == 0 and engine.stats()["num_waiting"] == 0
    finally:
        sender.close()
        server.stop()


def test_grpc_message_size_stays_bounded() -> None:
    from kv_transfer.grpc_server import CHANNEL_OPTIONS
    from kv_transfer.wire import CHUNK_BYTES

    options = dict(CHANNEL_OPTIONS)
    assert CHUNK_BYTES < options["grpc.max_receive_message_length"] <= 16 << 20
    assert options["grpc.max_send_message_length"] <= 16 << 20


def test_redis_header_over_limits_or_blob_size_mismatch_refused_before_get(engine: DecodeEngine, smollm2, tmp_path,
                                                                            monkeypatch) -> None:
    import redis

    import kv_transfer.redis_sender as rsender
    from kv_transfer.redis_sender import RedisSender
    from kv_transfer.redis_worker import RedisDecodeWorker
    from kv_transfer.wire import encode_handoff

    with running_redis(tmp_path / "redis") as rs:
        worker = RedisDecodeWorker(engine, rs.url, "t:", "replica-l", claim_idle_s=2, limits=_limits(engine))
        worker.start()
        sender = RedisSender(rs.url, "t:")
        client = redis.Redis.from_url(rs.url)
        try:
            assert _wait_ready(sender)
            final = _collect(sender.send, _oversized(smollm2, "r-long"))[-1]
            assert final.error_kind is ErrorKind.KV_REJECTED and "max_seq_len is 128" in (final.error or ""), final

            def padded(handoff: KVHandoff, kv_wire_format: str = "native") -> tuple[bytes, bytes]:
                header, data = encode_handoff(handoff, kv_wire_format)
                return header, data + b"\0" * 4096

            monkeypatch.setattr(rsender, "encode_handoff", padded)
            final = _collect(sender.send, _handoff(smollm2, "r-pad"))[-1]
            assert final.error_kind is ErrorKind.KV_REJECTED and "KV blob has" in (final.error or ""), final
            assert "cmdstat_get" not in client.info("commandstats")  # neither blob was fetched
        finally:
            sender.close()
            worker.stop()


def _wait_ready(sender, timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while not sender.is_ready()[0]:
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_redis_replica_with_an_unwell_engine_stops_looking_alive(engine: DecodeEngine, smollm2, tmp_path,
                                                                  monkeypatch) -> None:
    """A decode replica whose engine died or stalled takes no jobs and lets its alive key expire, so
    senders refuse at once (503) rather than queue work nobody will do."""
    from kv_transfer.redis_sender import NoDecodeReplicaError, RedisSender
    from kv_transfer.redis_worker import RedisDecodeWorker

    with running_redis(tmp_path / "redis") as rs:
        worker = RedisDecodeWorker(engine, rs.url, "u:", "replica-u", claim_idle_s=2)
        worker.start()
        sender = RedisSender(rs.url, "u:")
        try:
            assert _wait_ready(sender)
            monkeypatch.setattr(engine, "liveness", lambda: "decode-engine stopped: injected")
            deadline = time.monotonic() + 15
            while sender.is_ready()[0] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sender.is_ready() == (False, "no decode replica is alive on Redis")
            with pytest.raises(NoDecodeReplicaError):
                sender.send(_handoff(smollm2, "r-dead"), lambda event: None)
            monkeypatch.undo()
            assert _wait_ready(sender)  # healthy again: it beats again
        finally:
            sender.close()
            worker.stop()
