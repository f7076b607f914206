"""The KV wire decoder given random, truncated or bit-flipped bytes: HandoffError and nothing else.

A receiver must never crash (IndexError, OverflowError, RuntimeError, ...) nor allocate what a header
merely announces; every refusal is a HandoffError the transports turn into a 502 event. Native (version 2)
and encoded (version 3: bfloat16, int8) handoffs alike.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.wire import (
    KV_WIRE_FORMATS,
    KVLimits,
    check_header,
    decode_kv,
    encode_handoff,
    handoff_from_proto,
    kv_from_bytes,
    parse_header,
)
from prad.sampling import SamplingParams

LAYOUT = KVLayout(2, 3, 4, "float32", 5)
LIMITS = KVLimits(LAYOUT, max_length=64)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UINT32 = st.integers(0, 2**32 - 1)


def _encoded(dtype: torch.dtype = torch.float32, kv_wire_format: str = "native") -> tuple[bytes, bytes]:
    torch.manual_seed(0)
    layout = KVLayout(2, 3, 4, str(dtype).removeprefix("torch."), 5)
    handoff = KVHandoff("r1", "task", "v1", "fp", [1, 2, 3, 4, 5], 7, SamplingParams(8), None, layout,
                        torch.randn(layout.shape).to(dtype))
    return encode_handoff(handoff, kv_wire_format)


HEADER, KV = _encoded()
ENCODED = {fmt: _encoded(kv_wire_format=fmt) for fmt in KV_WIRE_FORMATS}  # native, bfloat16, int8 (fp32 model)
ENCODINGS = ["", "bfloat16", "int8", "int4", "x" * 99]  # header kv_encoding values, known or not


def _decode(raw_header: bytes, kv: bytes, limits: KVLimits | None = None) -> KVHandoff:
    header = parse_header(raw_header)
    check_header(header, limits)
    return handoff_from_proto(header, kv)


def test_valid_handoff_decodes_within_limits() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in KV_WIRE_FORMATS:
            header, kv = _encoded(dtype, fmt)
            back = _decode(header, kv, LIMITS).kv
            assert back.shape == LAYOUT.shape and back.dtype == dtype


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_header_raises_handoff_error_only(raw: bytes) -> None:
    try:
        header = parse_header(raw)
    except HandoffError:
        return
    with pytest.raises(HandoffError):
        handoff_from_proto(header, raw)


@FUZZ
@given(st.data())
def test_truncated_or_bit_flipped_header_raises_handoff_error_only(data: st.DataObject) -> None:
    header, kv = ENCODED[data.draw(st.sampled_from(KV_WIRE_FORMATS), label="format")]
    raw = bytearray(header[:data.draw(st.integers(0, len(header)), label="cut")])
    for _ in range(data.draw(st.integers(0, 4), label="num_flips") if raw else 0):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        _decode(bytes(raw), kv, LIMITS)
    except HandoffError:
        return
    # A change that still decodes can only have touched fields the layout check does not cover.
    assert bytes(raw) != header[:len(raw)] or len(raw) == len(header)


@FUZZ
@given(st.data())
def test_truncated_or_bit_flipped_kv_is_refused(data: st.DataObject) -> None:
    header, sent = ENCODED[data.draw(st.sampled_from(KV_WIRE_FORMATS), label="format")]
    kv = bytearray(sent[:data.draw(st.integers(0, len(sent)), label="cut")])
    num_flips = data.draw(st.integers(0 if len(kv) < len(sent) else 1, 4), label="num_flips") if kv else 0
    for _ in range(num_flips):
        kv[data.draw(st.integers(0, len(kv) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    if bytes(kv) == sent:
        return  # flips that cancelled out
    with pytest.raises(HandoffError):
        _decode(header, bytes(kv), LIMITS)


@FUZZ
@given(UINT32, UINT32, UINT32, UINT32, st.sampled_from(["float32", "bfloat16", "float16", "int8", "", "x" * 99]),
       st.integers(0, 2**64 - 1), st.sampled_from(ENCODINGS), st.integers(0, 5))
def test_absurd_layout_numbers_are_refused_before_reading_kv(num_layers: int, num_kv_heads: int, head_dim: int,
                                                             length: int, dtype: str, num_kv_bytes: int,
                                                             encoding: str, version: int) -> None:
    header = pb.HandoffHeader.FromString(HEADER)
    header.layout.CopyFrom(pb.KVLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                       dtype=dtype, length=length))
    header.num_kv_bytes = num_kv_bytes
    header.kv_encoding = encoding
    header.format_version = version
    fits = (num_layers, num_kv_heads, head_dim) == (2, 3, 4) and 0 < length <= 5 and dtype in (
        "float32", "bfloat16", "float16") and (version, encoding) in ((2, ""), (3, "bfloat16"), (3, "int8"))
    if not fits:
        with pytest.raises(HandoffError):
            parse_header(header.SerializeToString())
            check_header(header, LIMITS)
    with pytest.raises(HandoffError):
        handoff_from_proto(header, KV[:1024])  # never allocates what the header announces


@FUZZ
@given(st.builds(KVLayout, UINT32, UINT32, UINT32, st.sampled_from(["float32", "bfloat16", "int4"]), UINT32),
       st.binary(max_size=64))
def test_kv_from_bytes_raises_handoff_error_only(layout: KVLayout, data: bytes) -> None:
    try:
        kv = kv_from_bytes(data, layout)
    except HandoffError:
        return
    assert kv.shape == layout.shape and kv.numel() > 0


@FUZZ
@given(st.builds(KVLayout, st.integers(0, 3), st.integers(0, 3), st.integers(0, 5),
                 st.sampled_from(["float32", "bfloat16", "int4"]), st.integers(0, 3)),
       st.sampled_from(ENCODINGS), st.binary(max_size=256))
def test_decode_kv_raises_handoff_error_only(layout: KVLayout, encoding: str, data: bytes) -> None:
    """Small layouts, so that random payloads sometimes have exactly the right size and get decoded."""
    try:
        kv = decode_kv(data, layout, encoding)
    except HandoffError:
        return
    assert kv.shape == layout.shape and kv.numel() > 0 and str(kv.dtype) == f"torch.{layout.dtype}"


def test_huge_announced_kv_refused_by_limits() -> None:
    header = pb.HandoffHeader.FromString(HEADER)
    header.layout.length = 2**32 - 1
    with pytest.raises(HandoffError, match="max_seq_len"):
        check_header(header, LIMITS)
    header.layout.length = 5
    header.num_kv_bytes = 2**63
    with pytest.raises(HandoffError, match="announces"):
        check_header(header, LIMITS)
    header.num_kv_bytes = len(KV)
    header.layout.num_layers = 3
    with pytest.raises(HandoffError, match="num_layers=3"):
        check_header(header, LIMITS)
