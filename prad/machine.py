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


def cpuinfo() -> dict[str, str]:
    """This machine's first processor's fields; empty where /proc/cpuinfo is absent."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}
