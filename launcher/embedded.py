"""Embedded mode: prefill and decode in one process, linked by the in-process transport."""

from __future__ import annotations

import logging
import threading

import uvicorn
from fastapi import FastAPI

from adapters_store.directory import DirectoryStore
from decode_service.engine import DecodeConfig, DecodeEngine
from kv_transfer.inproc import InprocSender
from launcher.settings import ServeSettings
from prad.loading import LoadedModel, load_model
from prad.metrics import Metrics
from prefill_service.adapter_cache import AdapterCache
from prefill_service.app import create_app
from prefill_service.engine import PrefillConfig, PrefillEngine
from prefill_service.service import PrefillService

log = logging.getLogger(__name__)


def build_embedded_app(settings: ServeSettings, loaded: LoadedModel | None = None) -> FastAPI:
    """Everything for `prad serve --role all`; engines start and stop with the app's lifespan."""
    loaded = loaded or load_model(settings.model, settings.device, settings.dtype)
    # One lock around forward passes: prefill and decode threads must not oversubscribe the cores.
    compute_lock = threading.Lock()
    metrics = Metrics(settings.max_task_labels)
    max_seq_len = min(settings.max_seq_len, loaded.config.max_position_embeddings)
    decode = DecodeEngine(loaded, DecodeConfig(settings.max_batch_size, max_seq_len, settings.kv_budget,
                                               settings.max_waiting), compute_lock, metrics)
    sender = InprocSender(decode)
    prefill = PrefillEngine(loaded, sender, PrefillConfig(settings.max_prefill_tokens, 64, settings.max_waiting),
                            compute_lock, metrics)
    cache = AdapterCache(DirectoryStore(settings.adapters), loaded.model, loaded.fingerprint,
                         settings.max_loaded_adapters, metrics.adapter_event)
    for task, error in cache.validate_all().items():
        log.error("task %s will not be served: %s", task, error)
    service = PrefillService(loaded, cache, prefill, sender, max_seq_len, settings.request_timeout_s, metrics)

    def start() -> None:
        decode.start()
        prefill.start()

    def stop() -> None:
        prefill.stop()
        decode.stop()

    def readiness() -> dict[str, str]:
        problems = {}
        if not prefill.is_alive:
            problems["prefill"] = "prefill engine not running"
        if not decode.is_alive:
            problems["decode"] = "decode engine not running"
        return problems

    app = create_app(service, start, stop, readiness, settings.api_key)
    app.state.engines = {"prefill": prefill, "decode": decode}
    return app


def serve_embedded(settings: ServeSettings) -> None:
    app = build_embedded_app(settings)
    log.info("serving on http://%s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None)
