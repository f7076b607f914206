"""The CPU decode backend: a feature-major decode step with native kernels (docs/design.md)."""

from prad.cpu_decode.backend import CpuStepBackend, step_with_hooks

__all__ = ["CpuStepBackend", "step_with_hooks"]
