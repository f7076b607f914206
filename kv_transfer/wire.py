"""KVHandoff <-> bytes: a protobuf header plus the KV as raw tensor bytes (no pickle, ever).

Format version 2 (version 1 used zlib's crc32, about 10x slower than hardware CRC-32C). The receiver
checks the version, decodes the header, verifies the CRC-32C (Castagnoli) of the KV bytes against
the header's, then rebuilds the tensor with the dtype and shape the header declares.

Wire encodings of the KV (the prefill side's `kv_wire_format`; the receiver reads the header's
`kv_encoding`). The layout's dtype is always the model's: the receiver rebuilds the KV in it, so decode
never sees how the bytes travelled. L, H, T, D = layers, KV heads, tokens, head_dim; N = L * 2 * H * T * D.

* native (`kv_encoding` "", format version 2): the KV in the model's dtype, N * element size bytes,
  lossless; byte for byte what every earlier version 2 sender sent.
* "bfloat16" (version 3): the KV cast to bf16, N * 2 bytes (half of fp32; a bf16 model's KV is
  already bf16, so it goes native). Error: bf16 rounding, at most 2**-8 of each value.
* "int8" (version 3): symmetric int8 with one fp32 scale per (layer, K/V, KV head, token) vector,
  scale = amax over head_dim / 127 (0 for an all-zero vector, which decodes to zeros). Bytes, layer
  by layer (so a layer can be sent as soon as it is computed): the layer's scales, fp32 [2, H, T]
  (2HT * 4 bytes), then its values, int8 [2, H, T, D] (2HTD bytes): N * (1 + 4 / D) bytes in all,
  3.76x smaller than fp32 at D = 64. Error: at most scale / 2 per element. Per-token scales keep a
  position's outliers from costing the resolution of the others; per-head ones, one head's from
  costing the other heads'.

Every encoding is layer-major: the bytes of layer l are the encoding of kv[l] alone (`encode_layer`),
and the KV's bytes are its layers' in order. Version 4 uses that to stream: prefill sends the header
(its first_token_id and checksum 0) when its last pass starts, each layer's bytes as soon as that layer
is computed, and a HandoffTrailer (first token, CRC-32C of all the KV bytes) once the pass is done;
the KV bytes are exactly those of a version 2 or 3 handoff with the same kv_encoding, and the receiver
admits nothing before the trailer has arrived and the checksum matched.

Compressed handoffs are sent as version 3, so a receiver that knows only version 2 refuses them
("handoff format version 3 unsupported (expected 2)") instead of misreading the bytes; this receiver
takes both, and refuses an encoding it does not know, naming it. The CRC-32C covers the bytes as sent.

Every decoder here treats its input as hostile: random, truncated or corrupted bytes raise
HandoffError and nothing else, and an announced size is checked against the layout and encoding
(and, on the decode side, against decode's own limits) before any KV byte is read or allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import google_crc32c
import torch

from kv_transfer.base import TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from kv_transfer.outcome import FinishReason, parse_error_kind, parse_finish_reason
from kv_transfer.protos import kv_handoff_pb2 as pb
from prad.sampling import SamplingParams

FORMAT_VERSION = 2  # native KV
ENCODED_FORMAT_VERSION = 3  # KV in the header's kv_encoding
STREAMED_FORMAT_VERSION = 4  # KV in the header's kv_encoding ("" = native), streamed; first token in the trailer
FORMAT_VERSIONS = (FORMAT_VERSION, ENCODED_FORMAT_VERSION, STREAMED_FORMAT_VERSION)
KVWireFormat = Literal["native", "bfloat16", "int8"]
KV_WIRE_FORMATS: tuple[KVWireFormat, ...] = ("native", "bfloat16", "int8")
_ENCODINGS = ("bfloat16", "int8")  # the header's kv_encoding when not native ("")
_PASS_ELEMENTS = 1 << 20  # KV elements per int8 (de)quantization pass
CHUNK_BYTES = 4 << 20  # KV travels in 4 MiB chunks (gRPC messages are capped at 8 MiB)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# numpy has no bfloat16: move bf16 bytes as int16 and view them back.
_CARRIER = {torch.bfloat16: torch.int16}
_LAYOUT_DIMS = ("num_layers", "num_kv_heads", "head_dim")
M = TypeVar("M", pb.HandoffHeader, pb.HandoffTrailer)


@dataclass(frozen=True)
class KVLimits:
    """The KV a decode service can take, checked against a header before its KV is read."""

    layout: KVLayout  # decode's model: num_layers, num_kv_heads and head_dim must match (length ignored)
    max_length: int  # most prompt tokens (KV positions) per request: decode's max_seq_len


def layout_from_proto(header: pb.HandoffHeader) -> KVLayout:
    lay = header.layout
    return KVLayout(lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype, lay.length)


def kv_num_bytes(layout: KVLayout) -> int:
    """Bytes of KV the layout describes (plain integer arithmetic: absurd layouts cannot overflow)."""
    dtype = _DTYPES.get(layout.dtype)
    if dtype is None:
        raise HandoffError(f"KV dtype {layout.dtype!r} not supported (one of {sorted(_DTYPES)})")
    return math.prod(layout.shape) * torch.empty(0, dtype=dtype).element_size()


def kv_wire_num_bytes(layout: KVLayout, encoding: str = "") -> int:
    """Bytes of KV on the wire for `layout` in `encoding` ("" = native); HandoffError for an unknown one."""
    num_bytes = kv_num_bytes(layout)  # also checks the dtype the receiver rebuilds
    if encoding == "":
        return num_bytes
    if encoding == "bfloat16":
        return math.prod(layout.shape) * 2
    if encoding == "int8":  # per head_dim vector: one fp32 scale + head_dim int8 values
        return math.prod(layout.shape[:-1]) * (4 + layout.head_dim)
    raise HandoffError(f"KV encoding {encoding!r} unsupported (known: {', '.join(_ENCODINGS)})")


def check_encoding(header: pb.HandoffHeader) -> str:
    """The header's KV encoding ("" = native), once known and matching the format version."""
    encoding = header.kv_encoding
    if encoding and encoding not in _ENCODINGS:
        raise HandoffError(f"KV encoding {encoding!r} unsupported (known: {', '.join(_ENCODINGS)})")
    if header.format_version == FORMAT_VERSION and encoding:
        raise HandoffError(f"handoff format version {FORMAT_VERSION} carries native KV, not {encoding!r}")
    if header.format_version == ENCODED_FORMAT_VERSION and not encoding:
        raise HandoffError(f"handoff format version {ENCODED_FORMAT_VERSION} needs a KV encoding "
                           f"(one of {', '.join(_ENCODINGS)})")
    return encoding


def check_header(header: pb.HandoffHeader, limits: KVLimits | None = None) -> KVLayout:
    """The header's KV layout, once it is consistent (and within `limits`); HandoffError otherwise.

    The dtype may differ from decode's (decode casts the KV on admission); its element size is at
    most 4 bytes, and an encoding's at most 1 + 4 / head_dim, so the size stays bounded by decode's
    layout and max length either way.
    """
    encoding = check_encoding(header)
    layout = layout_from_proto(header)
    if limits is not None:
        for name in _LAYOUT_DIMS:
            if getattr(layout, name) != getattr(limits.layout, name):
                raise HandoffError(f"KV layout mismatch: {name}={getattr(layout, name)}, decode expects "
                                   f"{getattr(limits.layout, name)}")
        if layout.length > limits.max_length:
            raise HandoffError(f"KV covers {layout.length} tokens, decode max_seq_len is {limits.max_length}")
    if layout.length == 0 or layout.length != len(header.prompt_token_ids):
        raise HandoffError(f"KV layout length {layout.length} does not match the {len(header.prompt_token_ids)} "
                           f"prompt tokens")
    expected = kv_wire_num_bytes(layout, encoding)
    if header.num_kv_bytes != expected:
        raise HandoffError(f"header announces {header.num_kv_bytes} KV bytes, layout {list(layout.shape)} "
                           f"{layout.dtype}{f' as {encoding}' if encoding else ''} needs {expected}")
    return layout


def kv_to_bytes(kv: torch.Tensor) -> bytes:
    flat = kv.detach().contiguous().cpu()
    carrier = _CARRIER.get(flat.dtype)
    if carrier is not None:
        flat = flat.view(carrier)
    return flat.numpy().tobytes()


def kv_from_bytes(data: bytes | bytearray | memoryview, layout: KVLayout) -> torch.Tensor:
    expected = kv_num_bytes(layout)
    if len(data) != expected:
        raise HandoffError(f"KV payload has {len(data)} bytes, layout {list(layout.shape)} {layout.dtype} "
                           f"needs {expected}")
    if expected == 0:
        raise HandoffError(f"KV layout {list(layout.shape)} is empty")
    dtype = _DTYPES[layout.dtype]
    carrier = _CARRIER.get(dtype, dtype)
    writable = data if isinstance(data, bytearray) else bytearray(data)  # the tensor owns its bytes
    tensor = torch.frombuffer(writable, dtype=carrier)
    return tensor.view(dtype).view(layout.shape)


def check_wire_format(kv_wire_format: str) -> str:
    """`kv_wire_format` once it is one of KV_WIRE_FORMATS (senders check it when built); ValueError otherwise."""
    if kv_wire_format not in KV_WIRE_FORMATS:
        raise ValueError(f"kv_wire_format {kv_wire_format!r} unknown (one of {', '.join(KV_WIRE_FORMATS)})")
    return kv_wire_format


def wire_encoding(dtype: torch.dtype, kv_wire_format: str) -> str:
    """The header's kv_encoding for KV of `dtype` sent in `kv_wire_format`: "" (native) for "native", and
    for "bfloat16" when the KV already is bf16 (the same bytes, sent as version 2)."""
    if check_wire_format(kv_wire_format) == "native" or (kv_wire_format == "bfloat16" and dtype == torch.bfloat16):
        return ""
    return kv_wire_format


def _rows_per_pass(head_dim: int) -> int:
    """head_dim vectors per (de)quantization pass: ~4 MiB of fp32, so temporaries stay in cache and are
    reused, where whole-KV passes allocate (and page-fault in) several fresh KV-sized buffers."""
    return max(1, _PASS_ELEMENTS // max(head_dim, 1))


def quantize_int8(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [..., D], fp32 scales [...]): symmetric, scale = amax over the last dim / 127.

    An all-zero vector gets scale 0 and values 0 (divided by 1, never by 0: no NaN or inf)."""
    x = kv.detach().reshape(-1, kv.shape[-1])
    values = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = _rows_per_pass(x.shape[1])
    for start in range(0, x.shape[0], step):
        part = x[start:start + step].to(torch.float32, copy=True)  # a copy: divided in place below
        scale = part.abs().amax(dim=-1) / 127.0
        scales[start:start + step] = scale
        values[start:start + step] = part.div_(torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).round_().clamp_(
            -127, 127)
    return values.view(kv.shape), scales.view(kv.shape[:-1])


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values * scales (broadcast over the last dim) in `dtype`, pass by pass into one output."""
    v, s = values.reshape(-1, values.shape[-1]), scales.reshape(-1, 1)
    out = torch.empty(v.shape, dtype=dtype, device=v.device)
    step = _rows_per_pass(v.shape[1])
    for start in range(0, v.shape[0], step):
        torch.mul(v[start:start + step], s[start:start + step], out=out[start:start + step])
    return out.view(values.shape)


def encode_layer(kv: torch.Tensor, encoding: str = "") -> bytes:
    """One layer's KV [2, H, T, D] as sent in `encoding` ("" = native; layouts in the module docstring)."""
    if encoding == "":
        return kv_to_bytes(kv)
    if encoding == "bfloat16":
        return kv_to_bytes(kv.detach().to(torch.bfloat16))
    if encoding == "int8":
        values, scales = quantize_int8(kv)
        return kv_to_bytes(scales) + kv_to_bytes(values)
    raise ValueError(f"KV encoding {encoding!r} unknown (one of {', '.join(_ENCODINGS)})")


def encode_kv(kv: torch.Tensor, encoding: str = "") -> bytes:
    """The KV [L, 2, H, T, D] as sent in `encoding`: its layers' bytes in order (one pass when native or
    bfloat16, whose bytes are layer-major as they are)."""
    if encoding in ("", "bfloat16"):
        return encode_layer(kv, encoding)
    return b"".join(encode_layer(layer, encoding) for layer in kv)


def decode_kv(data: bytes | bytearray | memoryview, layout: KVLayout, encoding: str = "") -> torch.Tensor:
    """The KV in the layout's dtype from bytes sent in `encoding`; HandoffError unless the sizes match."""
    if encoding == "":
        return kv_from_bytes(data, layout)
    expected = kv_wire_num_bytes(layout, encoding)
    if len(data) != expected or expected == 0:
        raise HandoffError(f"KV payload has {len(data)} bytes, layout {list(layout.shape)} as {encoding} "
                           f"needs {expected}")
    dtype = _DTYPES[layout.dtype]
    if encoding == "bfloat16":
        return kv_from_bytes(data, replace(layout, dtype="bfloat16")).to(dtype)
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    out = torch.empty(layout.shape, dtype=dtype)
    layer_shape = layout.shape[1:]
    num_scales = math.prod(layer_shape[:-1])
    layer_bytes = expected // layout.num_layers
    for layer in range(layout.num_layers):
        offset = layer * layer_bytes
        scales = _frombuffer_f32(buffer, offset, num_scales).view(layer_shape[:-1])
        values = torch.frombuffer(buffer, dtype=torch.int8, offset=offset + 4 * num_scales,
                                  count=num_scales * layout.head_dim).view(layer_shape)
        out[layer] = dequantize_int8(values, scales, dtype)
    return out


def _frombuffer_f32(buffer: bytearray, offset: int, count: int) -> torch.Tensor:
    """`count` fp32 values at `offset` (copied when the offset is not 4-byte aligned: an odd head_dim)."""
    if offset % 4:
        return torch.frombuffer(bytearray(buffer[offset:offset + 4 * count]), dtype=torch.float32)
    return torch.frombuffer(buffer, dtype=torch.float32, offset=offset, count=count)


def kv_checksum(data: bytes, start: int = 0) -> int:
    """CRC-32C of `data`, continuing from `start` (the value over the bytes before it)."""
    return int(google_crc32c.extend(start, data))


def verify_checksum(header: pb.HandoffHeader, crc: int) -> None:
    if crc != header.checksum:
        raise HandoffError("KV checksum mismatch: the KV bytes were corrupted in transfer")


def header_to_proto(handoff: KVHandoff, num_kv_bytes: int, checksum: int, kv_encoding: str = "",
                    streamed: bool = False) -> pb.HandoffHeader:
    """The header: version 2 for native KV (`kv_encoding` ""), 3 for an encoded one, 4 for either when
    `streamed` (its first token and checksum then travel in the trailer: 0 here)."""
    s, lay = handoff.sampling, handoff.layout
    version = STREAMED_FORMAT_VERSION if streamed else ENCODED_FORMAT_VERSION if kv_encoding else FORMAT_VERSION
    return pb.HandoffHeader(
        format_version=version, request_id=handoff.request_id,
        task=handoff.task, adapter_version=handoff.adapter_version, model_fingerprint=handoff.model_fingerprint,
        prompt_token_ids=handoff.prompt_token_ids, first_token_id=0 if streamed else handoff.first_token_id,
        sampling=pb.SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                   top_k=s.top_k, seed=s.seed, stop=list(s.stop), ignore_eos=s.ignore_eos),
        deadline_s=handoff.deadline_s or 0.0,
        layout=pb.KVLayout(num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
                           dtype=lay.dtype, length=lay.length),
        checksum=0 if streamed else checksum, num_kv_bytes=num_kv_bytes, kv_encoding=kv_encoding)


def apply_trailer(header: pb.HandoffHeader, trailer: pb.HandoffTrailer) -> pb.HandoffHeader:
    """A version-4 header completed by its trailer (first token and checksum), ready for handoff_from_proto."""
    if header.format_version != STREAMED_FORMAT_VERSION:
        raise HandoffError(f"a trailer ends only a version {STREAMED_FORMAT_VERSION} handoff, not version "
                           f"{header.format_version}")
    done = pb.HandoffHeader()
    done.CopyFrom(header)
    done.first_token_id = trailer.first_token_id
    done.checksum = trailer.checksum
    return done


@dataclass
class KVReceived:
    """A handoff's KV bytes as they arrive, in pieces: each piece is checked against the header's byte
    count before it is kept, and the CRC-32C runs along (no second pass over the KV)."""

    header: pb.HandoffHeader
    data: bytearray = field(default_factory=bytearray)
    crc: int = 0  # of `data` so far

    @property
    def is_complete(self) -> bool:
        return len(self.data) == self.header.num_kv_bytes

    def add(self, piece: bytes) -> None:
        if len(self.data) + len(piece) > self.header.num_kv_bytes:
            raise HandoffError(f"received more KV bytes than the {self.header.num_kv_bytes} announced")
        self.crc = kv_checksum(piece, self.crc)
        self.data += piece

    def finish(self, trailer: pb.HandoffTrailer) -> pb.HandoffHeader:
        """The header completed by a version-4 handoff's trailer, once every announced byte is here."""
        if not self.is_complete:
            raise HandoffError(f"trailer after {len(self.data)} of {self.header.num_kv_bytes} KV bytes")
        return apply_trailer(self.header, trailer)


def parse_trailer(raw: bytes) -> pb.HandoffTrailer:
    return _parse(pb.HandoffTrailer(), raw, "handoff trailer")


def _parse(message: M, raw: bytes, what: str) -> M:
    """`message` filled from `raw`; HandoffError naming `what` for bytes protobuf cannot read."""
    try:
        message.ParseFromString(raw)
    except Exception as e:  # protobuf raises DecodeError subclasses
        raise HandoffError(f"malformed {what}: {e}") from e
    return message


def encode_handoff(handoff: KVHandoff, kv_wire_format: str = "native") -> tuple[bytes, bytes]:
    """(header bytes, KV bytes) for the wire, the KV in `kv_wire_format`; the header carries the CRC-32C
    of the KV bytes as sent."""
    encoding = wire_encoding(handoff.kv.dtype, kv_wire_format)
    data = encode_kv(handoff.kv, encoding)
    header = header_to_proto(handoff, len(data), kv_checksum(data), encoding)
    return header.SerializeToString(), data


def parse_header(raw: bytes) -> pb.HandoffHeader:
    header = _parse(pb.HandoffHeader(), raw, "handoff header")
    if header.format_version not in FORMAT_VERSIONS:
        raise HandoffError(f"handoff format version {header.format_version} unsupported (expected one of "
                           f"{', '.join(map(str, FORMAT_VERSIONS))})")
    return header


def handoff_from_proto(header: pb.HandoffHeader, kv_bytes: bytes | bytearray, crc: int | None = None) -> KVHandoff:
    """Check the layout, size and checksum (`crc`: already computed while receiving); rebuild the handoff."""
    layout = check_header(header)
    if len(kv_bytes) != header.num_kv_bytes:
        raise HandoffError(f"received {len(kv_bytes)} KV bytes, header announced {header.num_kv_bytes}")
    verify_checksum(header, kv_checksum(bytes(kv_bytes)) if crc is None else crc)
    s = header.sampling
    sampling = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, tuple(s.stop), s.ignore_eos)
    return KVHandoff(header.request_id, header.task, header.adapter_version, header.model_fingerprint,
                     list(header.prompt_token_ids), header.first_token_id, sampling, header.deadline_s or None,
                     layout, decode_kv(kv_bytes, layout, header.kv_encoding))


def event_to_proto(event: TokenEvent, first_token_index: int) -> pb.TokenEvent:
    return pb.TokenEvent(request_id=event.request_id, token_ids=event.token_ids, text=event.text,
                         finish_reason=event.finish_reason or "", error=event.error or "",
                         error_kind=event.error_kind or "", num_prompt_tokens=event.num_prompt_tokens,
                         num_output_tokens=event.num_output_tokens, first_token_index=first_token_index)


def event_from_proto(msg: pb.TokenEvent) -> TokenEvent:
    reason = parse_finish_reason(msg.finish_reason)
    kind = parse_error_kind(msg.error_kind) if reason is FinishReason.ERROR else None
    return TokenEvent(msg.request_id, list(msg.token_ids), msg.text, reason, msg.error or None, kind,
                      msg.num_prompt_tokens, msg.num_output_tokens, first_token_index=msg.first_token_index)


def chunks(data: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    """`data` in pieces of at most `size` bytes (itself, uncopied, when it fits in one)."""
    if len(data) <= size:
        return [data]
    return [data[i:i + size] for i in range(0, len(data), size)]
