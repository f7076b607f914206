"""Property tests of the HTTP request models: what they accept fits every transport's wire format, and
what they must refuse (out-of-range sampling, oversized stop lists, unsupported OpenAI fields) is
refused, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kv_transfer.outcome import ErrorKind
from kv_transfer.protos import kv_handoff_pb2 as pb
from prad.sampling import MAX_SEED, MAX_STOP_STRINGS
from prefill_service.api_models import MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_TOP_K, GenerateRequest
from prefill_service.openai_api import NEUTRAL_VALUES, ChatRequest, CompletionRequest, _to_generate

EDGES = [-1, 0, 1, MAX_NEW_TOKENS, MAX_TOP_K, MAX_TOP_K + 1, 2**31, 2**32, MAX_SEED, 2**63, 2**64]
ints = st.one_of(st.integers(-(2**70), 2**70), st.integers(-5, 5000), st.sampled_from(EDGES))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 12))
stops = st.lists(st.text(max_size=MAX_STOP_CHARS + 20), max_size=MAX_STOP_STRINGS + 3)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3), max_leaves=6)

generate_bodies = st.fixed_dictionaries(
    {"task": st.just("base"), "prompt": st.just("hi")},
    optional={"max_new_tokens": ints, "top_k": ints, "seed": ints, "temperature": floats, "top_p": floats,
              "stop": stops})


def _to_wire(req: GenerateRequest) -> pb.SamplingParams:
    """The sampling fields as the KV handoff carries them (gRPC and Redis alike), parsed back."""
    sent = pb.SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                             top_k=req.top_k, seed=req.seed or 0, stop=req.stop, ignore_eos=req.ignore_eos)
    received = pb.SamplingParams()
    received.ParseFromString(sent.SerializeToString())
    return received


def _errors(model: type, raw: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        model.model_validate(raw)
    except ValidationError as e:
        return e.errors()
    return []


@settings(max_examples=300, deadline=None)
@given(generate_bodies)
def test_accepted_requests_fit_the_wire_and_arrive_unchanged(raw: dict[str, Any]) -> None:
    if _errors(GenerateRequest, raw):
        return
    req = GenerateRequest.model_validate(raw)
    wire = _to_wire(req)
    assert (wire.max_new_tokens, wire.top_k, wire.seed, list(wire.stop)) == (
        req.max_new_tokens, req.top_k, req.seed or 0, req.stop)
    assert (wire.temperature, wire.top_p) == (req.temperature, req.top_p)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["max_new_tokens", "top_k", "seed"]), value=ints)
def test_out_of_range_integers_are_refused_naming_the_field(field: str, value: int) -> None:
    low, high = {"max_new_tokens": (1, MAX_NEW_TOKENS), "top_k": (0, MAX_TOP_K), "seed": (0, MAX_SEED)}[field]
    errors = _errors(GenerateRequest, {"task": "base", "prompt": "hi", field: value})
    assert bool(errors) == (not low <= value <= high)
    assert all(e["loc"][0] == field for e in errors)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["temperature", "top_p"]), value=floats)
def test_non_finite_or_out_of_range_floats_are_refused(field: str, value: float) -> None:
    errors = _errors(GenerateRequest, {"task": "base", "prompt": "hi", field: value})
    is_valid = 0.0 <= value <= 10.0 if field == "temperature" else 0.0 < value <= 1.0
    assert bool(errors) == (not is_valid)


@settings(max_examples=200, deadline=None)
@given(stop=stops)
def test_stop_lists_are_bounded_in_count_and_length(stop: list[str]) -> None:
    errors = _errors(GenerateRequest, {"task": "base", "prompt": "hi", "stop": stop})
    is_valid = len(stop) <= MAX_STOP_STRINGS and all(1 <= len(s) <= MAX_STOP_CHARS for s in stop)
    assert bool(errors) == (not is_valid)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(NEUTRAL_VALUES)), value=json_values)
def test_unsupported_openai_fields_are_refused_unless_neutral(field: str, value: Any) -> None:
    """Absent-equivalent values pass; anything that would ask for the feature is refused by name.
    (Values equal to a neutral one up to JSON number/bool coercion, like 0 for 0.0, may go either way.)"""
    neutral = NEUTRAL_VALUES[field]
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    completion = {"model": "base", "prompt": "hi"}
    model, raw = (ChatRequest, chat) if field in ChatRequest.model_fields else (CompletionRequest, completion)
    errors = _errors(model, {**raw, field: value})
    assert all(e["loc"][0] == field for e in errors), errors
    if value is None or any(value == n and type(value) is type(n) for n in neutral):
        assert not errors
    elif not any(value == n for n in neutral):
        assert errors


@settings(max_examples=200, deadline=None)
@given(raw=st.fixed_dictionaries({"model": st.just("base"), "prompt": st.just("hi")},
                                 optional={"max_tokens": ints, "seed": ints, "temperature": floats,
                                           "top_p": floats, "stop": st.one_of(st.text(max_size=300), stops)}))
def test_openai_requests_that_pass_convert_to_wire_fitting_requests(raw: dict[str, Any]) -> None:
    if _errors(CompletionRequest, raw):
        return
    body = CompletionRequest.model_validate(raw)
    try:
        gen = _to_generate(body, body.prompt if isinstance(body.prompt, str) else None, body.max_tokens)
    except Exception as e:  # the conversion may refuse (400), never crash
        assert getattr(e, "kind", None) is ErrorKind.INVALID, e
        return
    _to_wire(gen)


@pytest.mark.parametrize("extra", [{"user": "u-1"}, {"stream_options": {"include_usage": True}},
                                   {"metadata": {"x": 1}, "store": False}])
def test_harmless_openai_fields_are_accepted(extra: dict[str, Any]) -> None:
    CompletionRequest.model_validate({"model": "base", "prompt": "hi", **extra})
