"""Imports run one way (ARCHITECTURE.md): entry points -> services -> serving (what the services share)
-> kv_transfer / adapters_store -> prad core. Read from the source with `ast`, so the rule holds for
imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("prefill_service", "decode_service", "serving", "kv_transfer", "adapters_store", "launcher", "training")
IO_MODULES = ("torch", "fastapi", "starlette", "grpc", "redis", "httpx", "uvicorn", "socket", "subprocess")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in forbidden or m.startswith(forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_core_imports_no_package_above_it() -> None:
    assert offenders("prad", SERVICES) == {}


@pytest.mark.parametrize("package", ["kv_transfer", "adapters_store"])
def test_transports_and_store_import_no_service(package: str) -> None:
    above = tuple(p for p in ("prefill_service", "decode_service", "serving", "launcher", "training") if p != package)
    assert offenders(package, above) == {}


def test_the_shared_service_layer_imports_no_service() -> None:
    assert offenders("serving", ("prefill_service", "decode_service", "launcher", "training")) == {}


def test_decode_imports_no_adapter_code() -> None:
    assert offenders("decode_service", ("prad.adapters", "adapters_store", "prefill_service")) == {}


@pytest.mark.parametrize("scheduler", ["prefill_service/scheduler.py", "decode_service/scheduler.py"])
def test_schedulers_are_pure_logic(scheduler: str) -> None:
    imported = imported_modules(ROOT / scheduler)
    assert sorted(m for m in imported if m.split(".")[0] in IO_MODULES) == []


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from prefill_service.runner import PrefillRunner\n")
    assert "prefill_service.runner" in imported_modules(bad)
