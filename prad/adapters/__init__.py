"""PrAd adapter variants: configuration, safetensors I/O with validation, and per-row batch maths."""

from prad.adapters.config import VARIANTS, AdapterConfig, AdapterError
from prad.adapters.hooks import RowAdapters
from prad.adapters.io import Adapter, load_adapter, save_adapter

__all__ = ["VARIANTS", "Adapter", "AdapterConfig", "AdapterError", "RowAdapters", "load_adapter",
           "save_adapter"]
