from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fp32), loaded once per test session."""
    from prad.loading import load_model

    return load_model(None, "cpu", "float32")
