"""KV wire formats (kv_transfer.wire): native stays lossless and byte-identical to format version 2,
bfloat16 and int8 round trips stay within their rounding, their byte counts are what the docs say, and a
version 3 header is announced, checked and refused like any other before a KV byte is read."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.wire import (
    KV_WIRE_FORMATS,
    KVLimits,
    check_header,
    check_wire_format,
    decode_kv,
    encode_handoff,
    encode_kv,
    encode_layer,
    handoff_from_proto,
    kv_wire_num_bytes,
    parse_header,
    quantize_int8,
    wire_encoding,
)
from prad.sampling import SamplingParams

SMOLLM2 = (30, 3, 64)  # SmolLM2-135M: layers, KV heads, head_dim
SHAPE = (2, 2, 3, 7, 64)  # [layers, K/V, kv heads, tokens, head_dim]


def _handoff(kv: torch.Tensor, request_id: str = "r1") -> KVHandoff:
    layers, _, heads, length, head_dim = kv.shape
    layout = KVLayout(layers, heads, head_dim, str(kv.dtype).removeprefix("torch."), length)
    return KVHandoff(request_id, "task", "v1", "fp", list(range(1, length + 1)), 7,
                     SamplingParams(8, 0.5, 0.9, 3, 11, ("x",), True), 123.0, layout, kv)


def _round_trip(kv: torch.Tensor, kv_wire_format: str) -> torch.Tensor:
    header, data = encode_handoff(_handoff(kv), kv_wire_format)
    return handoff_from_proto(parse_header(header), data).kv


def _kv(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=gen) * torch.rand((*SHAPE[:-1], 1), generator=gen) * 10).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_round_trip_is_exact(dtype: torch.dtype) -> None:
    kv = _kv(dtype)
    back = _round_trip(kv, "native")
    assert back.dtype == dtype and torch.equal(back, kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bfloat16_round_trip_is_bf16_rounding_in_the_model_dtype(dtype: torch.dtype) -> None:
    kv = _kv(dtype)
    back = _round_trip(kv, "bfloat16")
    assert back.dtype == dtype and torch.equal(back, kv.to(torch.bfloat16).to(dtype))
    assert not torch.equal(back, kv)  # lossy: it did travel as bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_error_is_at_most_half_a_scale(dtype: torch.dtype) -> None:
    kv = _kv(dtype)
    before = kv.clone()
    back = _round_trip(kv, "int8")
    assert torch.equal(kv, before)  # the sender's KV is not touched (quantization divides a copy in place)
    assert back.dtype == dtype and back.shape == kv.shape
    x = kv.float()
    scales = x.abs().amax(dim=-1, keepdim=True) / 127
    error = (back.float() - x).abs()
    # bf16 models: the rebuilt value is rounded to bf16 once more (relative 2**-9)
    slack = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert bool((error <= scales / 2 * (1 + 1e-5) + x.abs() * slack).all())
    assert float((error / scales).max()) > 0.3  # the bound is tight, not vacuous


def test_int8_zero_and_constant_vectors_are_safe() -> None:
    kv = _kv()
    kv[0, 0, 0] = 0.0  # every token of one head: all-zero vectors (amax 0)
    kv[1, 1, 2, 3] = -2.5  # one all-equal vector
    kv[1, 0, 1, 4] = 1e-30  # tiny but non-zero
    values, scales = quantize_int8(kv)
    assert bool(torch.isfinite(scales).all()) and float(scales[0, 0, 0].abs().max()) == 0.0
    back = _round_trip(kv, "int8")
    assert bool(torch.isfinite(back).all())
    assert torch.equal(back[0, 0, 0], torch.zeros_like(back[0, 0, 0]))
    assert torch.allclose(back[1, 1, 2, 3], torch.full((64,), -2.5), rtol=1e-6, atol=0)
    assert bool((values[1, 1, 2, 3] == -127).all())
    assert torch.allclose(back[1, 0, 1, 4], torch.full((64,), 1e-30), rtol=1e-5, atol=0)


def test_int8_in_several_passes_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """(De)quantization runs in passes of _PASS_ELEMENTS; pass boundaries change nothing."""
    import kv_transfer.wire as wire

    kv = _kv()
    values, scales = quantize_int8(kv)
    data = encode_kv(kv, "int8")
    layout = _handoff(kv).layout
    monkeypatch.setattr(wire, "_PASS_ELEMENTS", 64 * 5)  # 5 vectors per pass: 17 passes, the last one short
    assert encode_kv(kv, "int8") == data
    assert torch.equal(decode_kv(data, layout, "int8"), values.float() * scales.unsqueeze(-1))


def test_all_zero_kv_decodes_to_zeros_without_nan() -> None:
    kv = torch.zeros(SHAPE)
    for fmt in KV_WIRE_FORMATS:
        assert torch.equal(_round_trip(kv, fmt), kv), fmt


@pytest.mark.parametrize(("dtype", "fmt", "per_token"), [
    ("float32", "native", 46_080), ("float32", "bfloat16", 23_040), ("float32", "int8", 12_240),
    ("bfloat16", "native", 23_040), ("bfloat16", "bfloat16", 23_040), ("bfloat16", "int8", 12_240)])
def test_bytes_per_token_per_format(dtype: str, fmt: str, per_token: int) -> None:
    """SmolLM2-135M: 30 layers x K,V x 3 heads x 64; int8 = 64 values + one 4-byte scale per head vector."""
    layers, heads, head_dim = SMOLLM2
    torch_dtype = getattr(torch, dtype)
    encoding = wire_encoding(torch_dtype, fmt)
    for length in (1, 5):
        layout = KVLayout(layers, heads, head_dim, dtype, length)
        assert kv_wire_num_bytes(layout, encoding) == per_token * length
        assert len(encode_kv(torch.ones(layout.shape, dtype=torch_dtype), encoding)) == per_token * length


def test_formats_are_announced_with_versions_an_old_receiver_refuses() -> None:
    kv = _kv()
    for fmt, version, encoding in (("native", 2, ""), ("bfloat16", 3, "bfloat16"), ("int8", 3, "int8")):
        header = parse_header(encode_handoff(_handoff(kv), fmt)[0])
        assert (header.format_version, header.kv_encoding) == (version, encoding), fmt
    # a bf16 model's KV already is bf16: "bfloat16" sends it natively, readable by any version 2 receiver
    header = parse_header(encode_handoff(_handoff(kv.to(torch.bfloat16)), "bfloat16")[0])
    assert (header.format_version, header.kv_encoding) == (2, "")


def _int8_header() -> tuple[pb.HandoffHeader, bytes]:
    raw, data = encode_handoff(_handoff(_kv()), "int8")
    return pb.HandoffHeader.FromString(raw), data


def test_unknown_encoding_is_refused_naming_it_and_the_known_ones() -> None:
    header, data = _int8_header()
    header.kv_encoding = "zstd-fp8"
    parsed = parse_header(header.SerializeToString())  # version 3 itself is fine
    for check in (lambda: check_header(parsed, KVLimits(_handoff(_kv()).layout, 64)),
                  lambda: handoff_from_proto(parsed, data)):
        with pytest.raises(HandoffError, match=r"KV encoding 'zstd-fp8' unsupported \(known: bfloat16, int8\)"):
            check()


def test_version_and_encoding_must_agree() -> None:
    header, data = _int8_header()
    header.format_version = 2
    with pytest.raises(HandoffError, match="version 2 carries native KV, not 'int8'"):
        handoff_from_proto(parse_header(header.SerializeToString()), data)
    header.format_version, header.kv_encoding = 3, ""
    with pytest.raises(HandoffError, match="version 3 needs a KV encoding"):
        check_header(header)
    header.format_version = 5
    with pytest.raises(HandoffError, match=r"format version 5 unsupported \(expected one of 2, 3, 4\)"):
        parse_header(header.SerializeToString())


def test_encoded_size_is_checked_before_reading_and_crc_covers_the_bytes_as_sent() -> None:
    header, data = _int8_header()
    header.num_kv_bytes = len(data) * 4  # what native fp32 would need: wrong for int8
    with pytest.raises(HandoffError, match="as int8 needs"):
        check_header(header)
    header.num_kv_bytes = len(data)
    flipped = bytearray(data)
    flipped[3] ^= 0x10  # inside the scales
    with pytest.raises(HandoffError, match="checksum mismatch"):
        handoff_from_proto(header, bytes(flipped))
    with pytest.raises(HandoffError, match="received"):
        handoff_from_proto(header, data[:-1])


def test_unknown_wire_format_is_refused_by_senders() -> None:
    assert check_wire_format("int8") == "int8"
    with pytest.raises(ValueError, match="kv_wire_format 'fp8' unknown"):
        check_wire_format("fp8")
    with pytest.raises(ValueError, match="unknown"):
        encode_handoff(_handoff(_kv()), "fp8")


def test_native_handoff_encodes_byte_identically_to_format_version_2() -> None:
    """Golden bytes made by the encoder before wire formats existed: a native handoff is unchanged."""
    layout = KVLayout(2, 3, 4, "float32", 5)
    kv = (torch.arange(2 * 2 * 3 * 5 * 4, dtype=torch.float32) / 7 - 8).reshape(layout.shape)
    handoff = KVHandoff("r1", "task", "v1", "fp", [1, 2, 3, 4, 5], 7, SamplingParams(8, 0.5, 0.9, 3, 11, ("x",), True),
                        123.0, layout, kv)
    golden = {
        torch.float32: ("0802120272311a047461736b220276312a026670320501020304053807421d080811000000000000e03f19cdcc"
                        "ccccccccec3f2003280b3201783801490000000000c05e4052110802100318042207666c6f61743332280558f9"
                        "faf18f0460c007", "38badfa45db7c301e82ad9aaa9fc6998f6e45d38c2dcaaf60d4cf255735075f8"),
        torch.bfloat16: ("0802120272311a047461736b220276312a026670320501020304053807421d080811000000000000e03f19cdc"
                         "cccccccccec3f2003280b3201783801490000000000c05e405212080210031804220862666c6f617431362805"
                         "588c91c6c20b60e003", "da44c97a500a495300cce8a04f5617fe2203f2308e16d9f3a1e75f5395cf4e93"),
    }
    for dtype, (header_hex, data_sha256) in golden.items():
        name = str(dtype).removeprefix("torch.")
        for fmt in ("native", "bfloat16") if dtype == torch.bfloat16 else ("native",):
            h = KVHandoff(**{**handoff.__dict__, "kv": kv.to(dtype), "layout": KVLayout(2, 3, 4, name, 5)})
            header, data = encode_handoff(h, fmt)
            assert header.hex() == header_hex and hashlib.sha256(data).hexdigest() == data_sha256, (dtype, fmt)
    assert encode_handoff(handoff) == encode_handoff(handoff, "native")  # the default


def test_int8_wire_layout_is_per_layer_scales_then_values() -> None:
    """The documented byte layout, layer by layer: fp32 scales [2, H, T], then int8 values [2, H, T, D]."""
    kv = _kv()
    values, scales = quantize_int8(kv)
    data = encode_kv(kv, "int8")
    offset = 0
    for layer in range(kv.shape[0]):
        num_scales = scales[layer].numel()
        assert data[offset:offset + 4 * num_scales] == scales[layer].numpy().tobytes()
        offset += 4 * num_scales
        assert data[offset:offset + values[layer].numel()] == values[layer].numpy().tobytes()
        offset += values[layer].numel()
    assert offset == len(data)
    layout = _handoff(kv).layout
    assert torch.equal(decode_kv(data, layout, "int8"), values.float() * scales.unsqueeze(-1))


@pytest.mark.parametrize("encoding", ["", "bfloat16", "int8"])
def test_kv_bytes_are_its_layers_bytes_in_order(encoding: str) -> None:
    """What lets version 4 stream: each layer encodes alone, and the KV is its layers' bytes in order."""
    kv = _kv()
    assert encode_kv(kv, encoding) == b"".join(encode_layer(layer, encoding) for layer in kv)


def test_int8_decodes_with_an_odd_head_dim() -> None:
    """Layer blocks then start at offsets that are not 4-byte aligned; the scales still read right."""
    kv = torch.randn(3, 2, 1, 5, 7)
    values, scales = quantize_int8(kv)
    layout = KVLayout(3, 1, 7, "float32", 5)
    assert torch.equal(decode_kv(encode_kv(kv, "int8"), layout, "int8"), values.float() * scales.unsqueeze(-1))
