"""The KV wire decoder given random, truncated or bit-flipped bytes: HandoffError and nothing else.

A receiver must never crash (IndexError, OverflowError, RuntimeError, ...) nor allocate what a header
merely announces; every refusal is a HandoffError the transports turn into a 502 event.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.wire import KVLimits, check_header, encode_handoff, handoff_from_proto, kv_from_bytes, parse_header
from prad.sampling import SamplingParams

LAYOUT = KVLayout(2, 3, 4, "float32", 5)
LIMITS = KVLimits(LAYOUT, max_length=64)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UINT32 = st.integers(0, 2**32 - 1)


def _encoded(dtype: torch.dtype = torch.float32) -> tuple[bytes, bytes]:
    torch.manual_seed(0)
    layout = KVLayout(2, 3, 4, str(dtype).removeprefix("torch."), 5)
    handoff = KVHandoff("r1", "task", "v1", "fp", [1, 2, 3, 4, 5], 7, SamplingParams(8), None, layout,
                        torch.randn(layout.shape).to(dtype))
    return encode_handoff(handoff)


HEADER, KV = _encoded()


def _decode(raw_header: bytes, kv: bytes, limits: KVLimits | None = None) -> KVHandoff:
    header = parse_header(raw_header)
    check_header(header, limits)
    return handoff_from_proto(header, kv)


def test_valid_handoff_decodes_within_limits() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        header, kv = _encoded(dtype)
        assert _decode(header, kv, LIMITS).kv.shape == LAYOUT.shape


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
    raw = bytearray(HEADER[:data.draw(st.integers(0, len(HEADER)), label="cut")])
    for _ in range(data.draw(st.integers(0, 4), label="num_flips") if raw else 0):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        _decode(bytes(raw), KV, LIMITS)
    except HandoffError:
        return
    # A change that still decodes can only have touched fields the layout check does not cover.
    assert bytes(raw) != HEADER[:len(raw)] or len(raw) == len(HEADER)


@FUZZ
@given(st.data())
def test_truncated_or_bit_flipped_kv_is_refused(data: st.DataObject) -> None:
    kv = bytearray(KV[:data.draw(st.integers(0, len(KV)), label="cut")])
    num_flips = data.draw(st.integers(0 if len(kv) < len(KV) else 1, 4), label="num_flips") if kv else 0
    for _ in range(num_flips):
        kv[data.draw(st.integers(0, len(kv) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    if bytes(kv) == KV:
        return  # flips that cancelled out
    with pytest.raises(HandoffError):
        _decode(HEADER, bytes(kv), LIMITS)


@FUZZ
@given(UINT32, UINT32, UINT32, UINT32, st.sampled_from(["float32", "bfloat16", "float16", "int8", "", "x" * 99]),
       st.integers(0, 2**64 - 1))
def test_absurd_layout_numbers_are_refused_before_reading_kv(num_layers: int, num_kv_heads: int, head_dim: int,
                                                             length: int, dtype: str, num_kv_bytes: int) -> None:
    header = pb.HandoffHeader.FromString(HEADER)
    header.layout.CopyFrom(pb.KVLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                       dtype=dtype, length=length))
    header.num_kv_bytes = num_kv_bytes
    fits = (num_layers, num_kv_heads, head_dim) == (2, 3, 4) and 0 < length <= 5 and dtype in (
        "float32", "bfloat16", "float16")
    if not fits:
        with pytest.raises(HandoffError):
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
