"""Benchmarks for PrAd Serve: run as modules from the repo root, e.g. `python -m bench.decode`.

Importing this package sets OMP_WAIT_POLICY=PASSIVE (unless already set) before any module imports
torch, so idle OpenMP threads sleep instead of spinning and stealing cores from the timed work.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
