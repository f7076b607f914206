"""What the benchmarks record about the machine: /proc/cpuinfo read for the first processor only."""

from __future__ import annotations

from bench.common import cpu_flags, cpu_id
from prad.machine import parse_cpuinfo

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse avx2 avx512f avx512_bf16 sha_ni

processor\t: 1
cpu family\t: 99
model name\t: something else
"""


def test_first_processor_fields_identify_the_cpu() -> None:
    fields = parse_cpuinfo(CPUINFO)
    assert fields["model name"] == "AMD EPYC"
    assert cpu_id(fields) == "family 26 model 2 stepping 1"
    assert cpu_flags(fields) == ["avx2", "avx512f", "avx512_bf16"]


def test_missing_fields_give_none_and_no_flags() -> None:
    fields = parse_cpuinfo("processor\t: 0\nmodel name\t: Some ARM\n")
    assert cpu_id(fields) is None and cpu_flags(fields) == []
