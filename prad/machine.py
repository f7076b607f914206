"""What this machine's CPU is, read from /proc/cpuinfo (benchmarks record it; the native kernels'
build cache is keyed by its feature flags)."""

from __future__ import annotations

from pathlib import Path


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's fields of a /proc/cpuinfo text ("model name", "cpu family", "flags", ...)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the blank line after the first processor
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware


def has_native_bf16(fields: dict[str, str] | None = None) -> bool:
    """Whether the CPU computes bf16 dot products natively (AVX-512 BF16 or AMX): there bf16 is much
    faster than fp32; elsewhere it is emulated and slower."""
    flags = set((cpuinfo() if fields is None else fields).get("flags", "").split())
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def cpuinfo() -> dict[str, str]:
    """This machine's first processor's fields; empty where /proc/cpuinfo is absent."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}
