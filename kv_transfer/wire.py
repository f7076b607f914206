"""KVHandoff <-> bytes: a protobuf header plus the KV as raw tensor bytes (no pickle, ever).

Format version 2 (version 1 used zlib's crc32, about 10x slower than hardware CRC-32C). The receiver
checks the version, decodes the header, verifies the CRC-32C (Castagnoli) of the KV bytes against
the header's, then rebuilds the tensor with the dtype and shape the header declares.

Every decoder here treats its input as hostile: random, truncated or corrupted bytes raise
HandoffError and nothing else, and an announced size is checked against the layout (and, on the
decode side, against decode's own limits) before any KV byte is read or allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import google_crc32c
import torch

from kv_transfer.base import TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from kv_transfer.outcome import FinishReason, parse_error_kind, parse_finish_reason
from kv_transfer.protos import kv_handoff_pb2 as pb
from prad.sampling import SamplingParams

FORMAT_VERSION = 2
CHUNK_BYTES = 4 << 20  # KV travels in 4 MiB chunks (gRPC messages are capped at 8 MiB)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# numpy has no bfloat16: move bf16 bytes as int16 and view them back.
_CARRIER = {torch.bfloat16: torch.int16}
_LAYOUT_DIMS = ("num_layers", "num_kv_heads", "head_dim")


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


def check_header(header: pb.HandoffHeader, limits: KVLimits | None = None) -> KVLayout:
    """The header's KV layout, once it is consistent (and within `limits`); HandoffError otherwise.

    The dtype may differ from decode's (decode casts the KV on admission); its element size is at
    most 4 bytes, so the size stays bounded by decode's layout and max length either way.
    """
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
    expected = kv_num_bytes(layout)
    if header.num_kv_bytes != expected:
        raise HandoffError(f"header announces {header.num_kv_bytes} KV bytes, layout {list(layout.shape)} "
                           f"{layout.dtype} needs {expected}")
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


def kv_checksum(data: bytes, start: int = 0) -> int:
    """CRC-32C of `data`, continuing from `start` (the value over the bytes before it)."""
    return int(google_crc32c.extend(start, data))


def verify_checksum(header: pb.HandoffHeader, crc: int) -> None:
    if crc != header.checksum:
        raise HandoffError("KV checksum mismatch: the KV bytes were corrupted in transfer")


def header_to_proto(handoff: KVHandoff, num_kv_bytes: int, checksum: int) -> pb.HandoffHeader:
    s, lay = handoff.sampling, handoff.layout
    return pb.HandoffHeader(
        format_version=FORMAT_VERSION, request_id=handoff.request_id, task=handoff.task,
        adapter_version=handoff.adapter_version, model_fingerprint=handoff.model_fingerprint,
        prompt_token_ids=handoff.prompt_token_ids, first_token_id=handoff.first_token_id,
        sampling=pb.SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                   top_k=s.top_k, seed=s.seed, stop=list(s.stop), ignore_eos=s.ignore_eos),
        deadline_s=handoff.deadline_s or 0.0,
        layout=pb.KVLayout(num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
                           dtype=lay.dtype, length=lay.length),
        checksum=checksum, num_kv_bytes=num_kv_bytes)


def encode_handoff(handoff: KVHandoff) -> tuple[bytes, bytes]:
    """(header bytes, KV bytes) for the wire; the header carries the KV bytes' CRC-32C."""
    data = kv_to_bytes(handoff.kv)
    header = header_to_proto(handoff, len(data), kv_checksum(data))
    return header.SerializeToString(), data


def parse_header(raw: bytes) -> pb.HandoffHeader:
    header = pb.HandoffHeader()
    try:
        header.ParseFromString(raw)
    except Exception as e:  # protobuf raises DecodeError subclasses
        raise HandoffError(f"malformed handoff header: {e}") from e
    if header.format_version != FORMAT_VERSION:
        raise HandoffError(f"handoff format version {header.format_version} unsupported (expected {FORMAT_VERSION})")
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
                     layout, kv_from_bytes(kv_bytes, layout))


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


def chunks(data: bytes, size: int = CHUNK_BYTES) -> list[memoryview]:
    view = memoryview(data)
    return [view[i:i + size] for i in range(0, len(view), size)] or [view[:0]]
