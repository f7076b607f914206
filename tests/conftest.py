"""Shared fixtures, and the tiers: tests/unit (no model, no processes, no C++ compile: seconds),
tests/integration (the real SmolLM2, the native kernels, real processes) and tests/e2e (the disaggregated
topologies as OS processes). Each test gets its tier's marker from its folder, so
`pytest -m "not integration and not e2e"` (`make test-fast`) runs the unit tier alone."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from tests.helpers import running_server, write_adapter

torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

TESTS = Path(__file__).resolve().parent
TIER_MARKERS = ("integration", "e2e")  # tests/unit gets no marker: what is left once these are deselected

# Random adapters big enough to change SmolLM2's greedy output (checked in test_invariant).
TASKS = {"pa-task": ("prad-pa", 0.5), "sa-task": ("prad-sa", 0.5), "lora-task": ("prad-lora", 0.3),
         "zero-task": ("prad-pa", 0.0)}


def _tier(path: Path) -> str | None:
    try:
        return path.resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tier(item.path)
        if tier in TIER_MARKERS:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Runs before the item's fixtures: a unit test that asks for the real model fails without loading it."""
    if _tier(item.path) == "unit" and "smollm2" in getattr(item, "fixturenames", ()):
        pytest.fail("tests/unit runs without the real model (smollm2): move this test to tests/integration",
                    pytrace=False)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fp32), loaded once per test session."""
    from prad.loading import load_model

    return load_model(None, "cpu", "float32")


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (task, (variant, scale)) in enumerate(TASKS.items()):
        write_adapter(root, task, variant, smollm2.config, smollm2.fingerprint, seed, scale,
                      template="Question: {input}\nAnswer:" if task == "pa-task" else None)
    for i in range(8):
        write_adapter(root, f"t{i}", ("prad-pa", "prad-sa", "prad-lora")[i % 3], smollm2.config,
                      smollm2.fingerprint, 100 + i, 0.3)
    return root


@pytest.fixture(scope="session")
def server(adapters_dir, smollm2):
    from launcher.embedded import build_embedded_app
    from launcher.settings import ServeSettings

    settings = ServeSettings(adapters=adapters_dir, dtype="float32", device="cpu", max_batch_size=32,
                             max_seq_len=512)
    with running_server(build_embedded_app(settings, smollm2)) as url:
        yield url
