"""The receiver refuses foreign, malformed and corrupted KV with a clear error, over gRPC and Redis."""

from __future__ import annotations

import queue
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
from kv_transfer.protos import kv_handoff_pb2 as pb
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

    def corrupt(handoff: KVHandoff) -> tuple[bytes, bytes]:
        header, data = encode_handoff(handoff)
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
    assert final.finish_reason == "error" and final.error_status == 502
    assert "model fingerprint mismatch" in (final.error or "")


def test_grpc_layout_mismatch_refused(grpc_sender: GrpcSender, smollm2) -> None:
    good = _handoff(smollm2, "lay-1")
    bad_layout = replace(good.layout, num_kv_heads=good.layout.num_kv_heads * 2, length=good.layout.length // 2)
    final = _collect(grpc_sender.send, replace(good, layout=bad_layout))[-1]
    assert final.error_status == 502 and "KV" in (final.error or "")


def test_grpc_corrupted_bytes_refused(grpc_sender: GrpcSender, smollm2, engine: DecodeEngine, monkeypatch) -> None:
    _corrupting(monkeypatch)
    final = _collect(grpc_sender.send, _handoff(smollm2, "crc-1"))[-1]
    assert final.error_status == 502 and "checksum mismatch" in (final.error or "")
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
            assert final.finish_reason == "error" and final.error_status == 503, (name, final)
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
            assert _collect(sender.send, _handoff(smollm2, "r-ok"))[-1].finish_reason == "length"
            foreign = replace(_handoff(smollm2, "r-fp"), model_fingerprint="other")
            final = _collect(sender.send, foreign)[-1]
            assert final.error_status == 502 and "model fingerprint mismatch" in (final.error or "")
            _corrupting(monkeypatch)
            final = _collect(sender.send, _handoff(smollm2, "r-crc"))[-1]
            assert final.error_status == 502 and "checksum mismatch" in (final.error or "")
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
