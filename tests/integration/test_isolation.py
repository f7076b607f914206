"""Per-request isolation and engine supervision: what one request causes fails that request alone;
an engine that dies or stalls says so through liveness (and /healthz), and never leaves a client waiting."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace

import httpx
import pytest
import torch

import prad.sampling
from decode_service.engine import DecodeConfig, DecodeEngine
from kv_transfer.base import TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from kv_transfer.inproc import InprocSender
from kv_transfer.outcome import EngineUnavailableError, ErrorKind
from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.reference import reference_generate
from prad.sampling import SamplingParams
from prefill_service.engine import PrefillConfig, PrefillEngine, PrefillRequest
from tests.helpers import random_adapter, running_server

TIMEOUT_S = 60.0


class Collector:
    """An event sink per request; `result(rid)` waits for its final event."""

    def __init__(self) -> None:
        self.events: dict[str, queue.Queue[TokenEvent]] = {}

    def sink(self, rid: str):
        q = self.events.setdefault(rid, queue.Queue())
        return q.put

    def result(self, rid: str) -> tuple[list[int], TokenEvent]:
        tokens: list[int] = []
        while True:
            event = self.events[rid].get(timeout=TIMEOUT_S)
            tokens += event.token_ids
            if event.is_final:
                return tokens, event


@pytest.fixture
def engines(smollm2):
    decode = DecodeEngine(smollm2, DecodeConfig(max_batch_size=8, max_seq_len=256, max_kv_tokens=8 * 256),
                          stall_timeout_s=0.5)
    prefill = PrefillEngine(smollm2, InprocSender(decode), PrefillConfig(), stall_timeout_s=0.5)
    decode.start()
    prefill.start()
    yield prefill, decode
    prefill.stop()
    decode.stop()


def _submit(prefill: PrefillEngine, collector: Collector, rid: str, ids: list[int], sampling: SamplingParams,
            adapter=None) -> None:
    prefill.submit(_request(rid, ids, sampling, adapter), collector.sink(rid))


def _request(rid: str, ids: list[int], sampling: SamplingParams, adapter=None) -> PrefillRequest:
    return PrefillRequest(rid, "t", ids, adapter=adapter, adapter_version=adapter.version if adapter else "base",
                          sampling=sampling, arrived_s=time.monotonic())


def _ids(smollm2, text: str) -> list[int]:
    return smollm2.tokenizer(text).input_ids


@pytest.mark.parametrize("params", [
    SamplingParams(8, temperature=1.0, top_p=1e-300, seed=1),  # below fp32's smallest value
    SamplingParams(8, temperature=1e-30, seed=2),  # greedy below the floor
    SamplingParams(8, temperature=10.0, top_k=2**40, seed=3),  # top_k past the vocabulary
    SamplingParams(8, temperature=5e-5, top_p=5e-8, top_k=1, seed=4),
])
def test_extreme_sampling_is_served_and_the_engine_goes_on(engines, smollm2, params) -> None:
    prefill, decode = engines
    col = Collector()
    ids = _ids(smollm2, "The capital of France is")
    _submit(prefill, col, "x", ids, replace(params, ignore_eos=True))
    tokens, final = col.result("x")
    assert final.finish_reason == "length" and len(tokens) == 8
    assert all(0 <= t < smollm2.config.vocab_size for t in tokens)
    if params.temperature < 1e-5 or params.top_p < 1e-7:  # greedy, or a nucleus of one token
        assert tokens == reference_generate(smollm2.model, None, ids, 8, ignore_eos=True)
    _submit(prefill, col, "after", ids, SamplingParams(4, ignore_eos=True))
    assert col.result("after")[1].finish_reason == "length"
    assert prefill.liveness() is None and decode.liveness() is None


def test_a_failure_sampling_one_request_fails_it_alone(engines, smollm2, monkeypatch) -> None:
    prefill, decode = engines
    real = prad.sampling.sample_one

    def poisoned(logits, params, index):
        if params.seed == 666 and index == 3:
            raise RuntimeError("injected sampling fault")
        return real(logits, params, index)

    monkeypatch.setattr("decode_service.engine.sample_one", poisoned)
    monkeypatch.setattr("prad.sampling.sample_one", poisoned)
    col = Collector()
    ids = _ids(smollm2, "Once upon a time")
    for rid, seed in (("good1", 1), ("bad", 666), ("good2", 2)):
        _submit(prefill, col, rid, ids, SamplingParams(8, temperature=0.8, seed=seed, ignore_eos=True))
    bad_tokens, bad = col.result("bad")
    assert bad.finish_reason == "error" and "injected sampling fault" in (bad.error or "")
    assert len(bad_tokens) == 3  # tokens before the fault arrived, then the error
    for rid in ("good1", "good2"):
        tokens, final = col.result(rid)
        assert final.finish_reason == "length" and len(tokens) == 8
    assert decode.liveness() is None and decode.stats()["num_running"] == 0


def test_a_failing_first_token_fails_only_its_request(engines, smollm2, monkeypatch) -> None:
    prefill, _ = engines
    real = prad.sampling.sample_one

    def poisoned(logits, params, index):
        if params.seed == 13:
            raise RuntimeError("injected first-token fault")
        return real(logits, params, index)

    monkeypatch.setattr("prefill_service.engine.sample_one", poisoned)
    col = Collector()
    ids = _ids(smollm2, "Hello there")
    _submit(prefill, col, "bad", ids, SamplingParams(4, temperature=1.0, seed=13))
    _submit(prefill, col, "good", ids, SamplingParams(4, ignore_eos=True))
    assert col.result("bad")[1].error_kind is ErrorKind.INTERNAL
    assert col.result("good")[1].finish_reason == "length"
    assert prefill.liveness() is None


def test_a_failing_prefill_batch_is_retried_one_request_at_a_time(engines, smollm2, monkeypatch) -> None:
    prefill, _ = engines
    poison = random_adapter("prad-pa", smollm2.config, smollm2.fingerprint, 5, 0.3)
    real_run = prefill.runner.run

    def run(chunks, outputs=None, on_layer=None):
        if any(c.adapter is poison for c in chunks):
            raise RuntimeError("injected adapter fault")
        return real_run(chunks, outputs, on_layer)

    monkeypatch.setattr(prefill.runner, "run", run)
    col = Collector()
    with prefill._lock:  # queue all three before the engine looks: one batch
        _submit(prefill, col, "a", _ids(smollm2, "First prompt"), SamplingParams(3, ignore_eos=True))
        _submit(prefill, col, "p", _ids(smollm2, "Poisoned prompt"), SamplingParams(3), adapter=poison)
        _submit(prefill, col, "b", _ids(smollm2, "Second prompt"), SamplingParams(3, ignore_eos=True))
    assert "injected adapter fault" in (col.result("p")[1].error or "")
    for rid, text in (("a", "First prompt"), ("b", "Second prompt")):
        tokens, _ = col.result(rid)
        assert tokens == reference_generate(smollm2.model, None, _ids(smollm2, text), 3, ignore_eos=True)
    assert prefill.metrics.step_failures.labels("prefill")._value.get() == 1


def test_a_consumer_that_cannot_take_events_is_dropped(engines, smollm2) -> None:
    prefill, decode = engines
    col = Collector()
    calls = []

    def broken_sink(event: TokenEvent) -> None:
        calls.append(event)
        if len(calls) >= 2:
            raise RuntimeError("event loop closed")

    ids = _ids(smollm2, "Tell me a story")
    prefill.submit(_request("gone", ids, SamplingParams(50, ignore_eos=True)), broken_sink)
    _submit(prefill, col, "ok", ids, SamplingParams(6, ignore_eos=True))
    assert col.result("ok")[1].finish_reason == "length"
    deadline = time.monotonic() + TIMEOUT_S
    while decode.stats()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decode.stats()["num_running"] == 0 and len(calls) == 2  # dropped at the first failed delivery
    assert decode.liveness() is None


def test_decode_refuses_out_of_range_ids_and_parameters(engines, smollm2) -> None:
    prefill, decode = engines
    col = Collector()
    _submit(prefill, col, "ref", _ids(smollm2, "Hi"), SamplingParams(2))
    col.result("ref")
    v, c = smollm2.config.vocab_size, smollm2.config
    kv = torch.zeros(c.num_layers, 2, c.num_kv_heads, 2, c.head_dim)
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", 2)

    def handoff(**kw) -> KVHandoff:
        base = dict(request_id="h", task="t", adapter_version="base", model_fingerprint=smollm2.fingerprint,
                    prompt_token_ids=[1, 2], first_token_id=3, sampling=SamplingParams(4), deadline_s=None,
                    layout=layout, kv=kv)
        return KVHandoff(**{**base, **kw})

    for bad in (handoff(first_token_id=v), handoff(prompt_token_ids=[1, -1]),
                handoff(sampling=SamplingParams(4, temperature=float("nan"))),
                handoff(sampling=SamplingParams(4, top_p=0.0)), handoff(sampling=SamplingParams(0))):
        with pytest.raises(HandoffError):
            decode.submit(bad, col.sink("h"))
    assert decode.stats()["num_running"] == 0


def test_a_dead_engine_fails_its_requests_refuses_new_ones_and_fails_healthz(smollm2) -> None:
    settings = ServeSettings(dtype="float32", device="cpu", max_seq_len=256, adapters=None)
    app = build_app(settings, smollm2)
    with running_server(app) as url:
        prefill: PrefillEngine = app.state.engines["prefill"]
        gate = threading.Event()

        def crash(*_args: object) -> None:
            gate.wait(TIMEOUT_S)
            raise RuntimeError("injected loop bug")

        prefill.scheduler.schedule = crash  # the next schedule() call escapes the loop
        body = {"task": "base", "prompt": "Hello", "max_new_tokens": 4}
        with httpx.Client(timeout=TIMEOUT_S) as client:
            assert client.get(url + "/healthz").status_code == 200
            pending = threading.Thread(target=lambda: results.append(client.post(url + "/generate", json=body)))
            results: list[httpx.Response] = []
            pending.start()
            time.sleep(0.3)
            gate.set()
            pending.join(TIMEOUT_S)
            assert results and results[0].status_code == 503, results
            assert "injected loop bug" in results[0].json()["detail"]
            health = client.get(url + "/healthz")
            assert health.status_code == 503 and "prefill" in health.json()["problems"]
            ready = client.get(url + "/readyz")
            assert ready.status_code == 503 and "injected loop bug" in ready.json()["not_ready"]["prefill"]
            started = time.monotonic()
            refused = client.post(url + "/generate", json=body)
            assert refused.status_code == 503 and time.monotonic() - started < 5.0
    with pytest.raises(EngineUnavailableError):
        prefill.check_accepting()


def test_a_stalled_step_is_reported_until_the_engine_moves_again(engines, smollm2, monkeypatch) -> None:
    prefill, decode = engines
    release = threading.Event()
    real_decode = decode.runner.decode

    def slow(*args, **kwargs):
        release.wait(TIMEOUT_S)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(decode.runner, "decode", slow)
    col = Collector()
    _submit(prefill, col, "s", _ids(smollm2, "Slowly"), SamplingParams(3, ignore_eos=True))
    deadline = time.monotonic() + TIMEOUT_S
    while decode.liveness() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "no progress" in (decode.liveness() or "")
    release.set()
    assert col.result("s")[1].finish_reason == "length"
    time.sleep(0.1)
    assert decode.liveness() is None
