"""`prad serve` as real OS processes on loopback, for the disaggregated tests: launcher/local.py's
ServeProcess (which the benchmarks use too) plus what only the tests need."""

from __future__ import annotations

from launcher import local

__all__ = ["ServeProcess"]


class ServeProcess(local.ServeProcess):
    def start(self, wait_ready: bool = True, timeout_s: float = 120.0) -> ServeProcess:
        """Start the process and wait until /readyz answers 200 or, with wait_ready=False, until /healthz does
        (a prefill whose decode is not up yet, or one that the decode refuses)."""
        if wait_ready:
            super().start(timeout_s)
        else:
            self.launch()
            self.wait("/healthz", timeout_s)
        return self
