"""`--dtype auto`: bf16 on GPUs and on CPUs with native bf16, fp32 on other CPUs (prad/loading.py)."""

from __future__ import annotations

import pytest
import torch

import prad.loading
from prad.loading import pick_dtype
from prad.machine import has_native_bf16


@pytest.mark.parametrize(("flags", "native"), [("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                               ("avx2 amx_tile amx_bf16", True), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(flags: str, native: bool) -> None:
    assert has_native_bf16({"flags": flags}) is native


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(prad.loading, "has_native_bf16", lambda: False)
    assert pick_dtype("auto", cpu) is torch.float32 and pick_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(prad.loading, "has_native_bf16", lambda: True)
    assert pick_dtype("auto", cpu) is torch.bfloat16
    assert pick_dtype("float32", cpu) is torch.float32  # an explicit dtype always wins
