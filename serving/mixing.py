"""Prompt chunks riding in decode steps (role all): what the decode engine sees of prefill's work.

With prefill and decode in one process on the same cores, a separate prefill pass stalls every stream
being decoded for its whole length. With `--mixed-prefill-tokens N`, while requests are decoding each
decode step takes up to N waiting prompt tokens from the prefill engine and computes them in its own
pass (prad/cpu_decode/mixed.py); the prefill engine runs passes of its own only while decode is idle.
The decode engine knows prefill's work only through this interface (it never sees an adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from prad.cpu_decode.mixed import PromptChunks


class ChunkWork(Protocol):
    """Prompt chunks taken for one decode step."""

    chunks: PromptChunks  # what the step computes; their K/V land in chunks.kv

    def done(self, logits: torch.Tensor) -> None:
        """The step computed them: logits [R, V] at each chunk's last token."""

    def failed(self, error: Exception) -> None:
        """The step could not compute them (the decode rows were stepped alone)."""


ChunkSource = Callable[[int], ChunkWork | None]  # up to N prompt tokens of waiting work, or None
