"""`prad serve` as real OS processes on loopback, for the disaggregated tests (see launcher/local.py)."""

from launcher.local import ServeProcess

__all__ = ["ServeProcess"]
