from __future__ import annotations

import pytest

from launcher.embedded import build_embedded_app
from launcher.settings import ServeSettings
from tests.helpers import running_server, write_adapter

# Random adapters big enough to change SmolLM2's greedy output (checked in test_invariant).
TASKS = {"pa-task": ("prad-pa", 0.5), "sa-task": ("prad-sa", 0.5), "lora-task": ("prad-lora", 0.3),
         "zero-task": ("prad-pa", 0.0)}


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
    settings = ServeSettings(adapters=adapters_dir, dtype="float32", device="cpu", max_batch_size=32,
                             max_seq_len=512)
    with running_server(build_embedded_app(settings, smollm2)) as url:
        yield url
