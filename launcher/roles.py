"""Wiring roles and transports into running processes.

role=all runs prefill and decode in one process (in-process transport by default, or a real gRPC /
Redis link for testing and benchmarking it); role=prefill runs the HTTP front door with a sender to
a remote decode; role=decode runs the decode engine behind a gRPC server or a Redis consumer, with
its own /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from adapters_store.base import VersionedAdapterStore
from adapters_store.filesystem import FilesystemStore
from adapters_store.serving import ServingStore, seed_from_folder
from decode_service.app import create_decode_app
from decode_service.engine import DecodeConfig, DecodeEngine
from kv_transfer.base import KVSender
from kv_transfer.grpc_server import DecodeServicer, GrpcDecodeServer, TLSFiles
from kv_transfer.inproc import InprocSender
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.wire import KVLimits
from launcher.settings import ServeSettings
from launcher.watchdog import Watchdog
from prad.loading import LoadedModel, load_model
from prefill_service.adapter_cache import AdapterCache
from prefill_service.admin_api import AdminService, build_admin_router
from prefill_service.app import create_app
from prefill_service.engine import PrefillConfig, PrefillEngine
from prefill_service.service import PrefillService
from serving.engine_loop import EngineLoop
from serving.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Lifecycle:
    """What a process starts on boot and stops on shutdown, in order, plus its readiness checks (can it
    take traffic now) and liveness checks (is it broken until restarted: a dead or stalled engine)."""

    starts: list[Callable[[], None]] = field(default_factory=list)
    stops: list[Callable[[], None]] = field(default_factory=list)
    checks: list[Callable[[], dict[str, str]]] = field(default_factory=list)
    engines: dict[str, EngineLoop] = field(default_factory=dict)

    def start(self) -> None:
        for start in self.starts:
            start()

    def stop(self) -> None:
        for stop in reversed(self.stops):
            stop()

    def readiness(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        for check in self.checks:
            problems.update(check())
        problems.update(self.liveness())  # why an engine is down says more than "not running"
        return problems

    def liveness(self) -> dict[str, str]:
        return {name: problem for name, engine in self.engines.items() if (problem := engine.liveness())}


def _max_seq_len(settings: ServeSettings, loaded: LoadedModel) -> int:
    return min(settings.max_seq_len, loaded.config.max_position_embeddings)


def _tls(settings: ServeSettings, side: str) -> TLSFiles | None:
    """The TLS files for the gRPC `side` ("server": decode, "client": prefill), or None for plaintext.

    A half-configured TLS setting is an error, never a silent fall-back to plaintext.
    """
    tls = TLSFiles(settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_ca)
    problem = tls_problem(tls, side)
    if problem:
        raise ValueError(problem)
    wanted = (tls.cert or tls.key) if side == "server" else tls.ca
    return tls if wanted else None


def tls_problem(tls: TLSFiles, side: str) -> str | None:
    """Why these TLS files cannot secure the `side` of the gRPC link, or None when they can."""
    if side == "server" and bool(tls.cert) != bool(tls.key):
        return "decode TLS needs both --grpc-tls-cert and --grpc-tls-key (PRAD_GRPC_TLS_CERT/_KEY)"
    if side == "client" and (tls.cert or tls.key) and not tls.ca:
        return ("prefill TLS needs --grpc-tls-ca (the CA that signed decode's certificate); "
                "--grpc-tls-cert/--grpc-tls-key are decode's own files")
    return None


def replica_name(settings: ServeSettings) -> str:
    return settings.replica_name or f"{socket.gethostname()}-{os.getpid()}"


def _decode_engine(settings: ServeSettings, loaded: LoadedModel, lock: AbstractContextManager[object] | None,
                   metrics: Metrics, life: Lifecycle) -> DecodeEngine:
    engine = DecodeEngine(loaded, DecodeConfig(settings.max_batch_size, _max_seq_len(settings, loaded),
                                               settings.kv_budget, settings.max_waiting, settings.decode_graphs,
                                               settings.mixed_prefill_tokens),
                          lock, metrics, settings.engine_stall_timeout_s)
    life.starts.append(engine.start)
    life.stops.append(engine.stop)
    life.checks.append(lambda: {} if engine.is_alive else {"decode": "decode engine not running"})
    life.engines["decode"] = engine
    return engine


def _receiver(settings: ServeSettings, engine: DecodeEngine, loaded: LoadedModel, life: Lifecycle) -> None:
    """Expose a decode engine on the configured transport."""
    if settings.transport == "grpc":
        def health() -> pb.HealthReply:
            stats = engine.stats()
            return pb.HealthReply(model_fingerprint=loaded.fingerprint, num_running=stats["num_running"],
                                  num_waiting=stats["num_waiting"])

        limits = KVLimits(engine.expected_layout, engine.config.max_seq_len)
        server = GrpcDecodeServer(DecodeServicer(engine, health, settings.grpc_secret, limits), settings.grpc_host,
                                  settings.grpc_port, _tls(settings, "server"))
        life.starts.append(server.start)
        # shutdown drains: new calls refused at once, streams in flight finish within the drain timeout
        life.stops.append(lambda: server.stop(grace_s=settings.drain_timeout_s))
    elif settings.transport == "redis":
        from kv_transfer.redis_worker import RedisDecodeWorker

        worker = RedisDecodeWorker(engine, settings.redis_url, settings.redis_prefix, replica_name(settings),
                                   settings.claim_idle_s, KVLimits(engine.expected_layout, engine.config.max_seq_len))
        life.starts.append(worker.start)
        # stops run last-added first: take no new jobs, let running ones finish, then stop publishing
        life.stops.append(worker.stop)
        life.stops.append(lambda: _drain(engine, settings.drain_timeout_s))
        life.stops.append(worker.stop_intake)
        life.checks.append(worker.readiness)


def _drain(engine: DecodeEngine, timeout_s: float) -> None:
    stats = engine.stats()
    if stats["num_running"] or stats["num_waiting"]:
        log.info("draining: %d running, %d waiting (up to %.0f s)", stats["num_running"], stats["num_waiting"],
                 timeout_s)
    if not engine.wait_idle(timeout_s):
        log.warning("drain timeout: aborting %d request(s) still running", engine.stats()["num_running"])


def make_sender(settings: ServeSettings) -> KVSender:
    if settings.transport == "grpc":
        from kv_transfer.grpc_client import GrpcSender

        return GrpcSender(settings.decode_addr, settings.grpc_secret, _tls(settings, "client"),
                          settings.request_timeout_s, settings.kv_wire_format)
    if settings.transport == "redis":
        from kv_transfer.redis_sender import RedisSender

        return RedisSender(settings.redis_url, settings.redis_prefix, settings.kv_ttl_s, settings.request_timeout_s,
                           settings.claim_idle_s, settings.replica_lost_s, settings.kv_wire_format)
    raise ValueError(f"role {settings.role!r} needs --transport grpc or redis (inproc links only role=all)")


def _front_door(settings: ServeSettings, loaded: LoadedModel, sender: KVSender, lock: AbstractContextManager[object]
                | None, metrics: Metrics, life: Lifecycle) -> FastAPI:
    config = PrefillConfig(settings.max_prefill_tokens, settings.max_prefill_batch, settings.max_waiting,
                           settings.prefix_cache_mb << 20, settings.prefix_cache_block_tokens, settings.kv_stream,
                           settings.kv_stream_min_tokens)
    prefill = PrefillEngine(loaded, sender, config, lock, metrics, settings.engine_stall_timeout_s)
    store = _versioned_store(settings, life)
    seed_errors = seed_from_folder(store, settings.adapters)
    # Created after seeding, so only changes made while serving count as hot swaps.
    serving = ServingStore(store, settings.adapter_poll_s, lambda task, _: metrics.adapter_swaps.labels(
        metrics.task(task)).inc())
    serving.seed_errors = seed_errors
    life.starts.append(serving.start)
    life.stops.append(serving.stop)
    cache = AdapterCache(serving, loaded.model, loaded.fingerprint, settings.max_loaded_adapters,
                         metrics.adapter_event)
    for task, error in cache.validate_all().items():
        log.error("task %s will not be served: %s", task, error)
    service = PrefillService(loaded, cache, prefill, _max_seq_len(settings, loaded),
                             settings.request_timeout_s, metrics, settings.allow_version_pinning)
    life.starts.append(prefill.start)
    life.stops.append(prefill.stop)
    life.stops.insert(0, sender.close)  # closed last (stops run in reverse)
    life.checks.append(lambda: {} if prefill.is_alive else {"prefill": "prefill engine not running"})
    life.engines["prefill"] = prefill
    life.checks.append(lambda: _sender_check(sender))
    admin = None
    if settings.admin_token:
        admin = build_admin_router(AdminService(store, loaded, settings.max_adapter_bytes, cache, metrics),
                                   settings.admin_token)
    app = create_app(service, life.start, life.stop, life.readiness, settings.api_key, admin,
                     settings.max_adapter_bytes + (2 << 20), liveness=life.liveness,
                     body_timeout_s=settings.http_body_timeout_s)
    app.state.engines = {"prefill": prefill}
    app.state.store = store
    return app


def _versioned_store(settings: ServeSettings, life: Lifecycle) -> VersionedAdapterStore:
    """The adapter store: a folder (default: a temp dir for this process), indexed in Redis when shared."""
    root = settings.store
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="prad-store-")
        life.stops.append(tmp.cleanup)
        root = Path(tmp.name)
    if settings.store_redis_url:
        from adapters_store.redis_index import RedisIndexStore

        store = RedisIndexStore(settings.store_redis_url, root, prefix=settings.redis_prefix + "adapters:",
                                poll_interval_s=settings.adapter_poll_s)
        life.stops.append(store.close)
        life.checks.append(lambda: _store_check(store))
        return store
    return FilesystemStore(root)


def _store_check(store: object) -> dict[str, str]:
    try:
        store.ping()  # type: ignore[attr-defined]
    except Exception as e:
        return {"adapter_store": str(e)}
    return {}


def _sender_check(sender: KVSender) -> dict[str, str]:
    ok, reason = sender.is_ready()
    return {} if ok else {"transport": reason}


def build_app(settings: ServeSettings, loaded: LoadedModel | None = None) -> FastAPI:
    """The FastAPI app of this process's role; engines and transports start with its lifespan."""
    loaded = loaded or load_model(settings.model, settings.device, settings.dtype)
    metrics = Metrics(settings.max_task_labels)
    life = Lifecycle()
    if settings.exit_when_unhealthy_s is not None:
        watchdog = Watchdog(life.liveness, settings.exit_when_unhealthy_s)
        life.starts.append(watchdog.start)
        life.stops.append(watchdog.stop)
    if settings.role == "decode":
        engine = _decode_engine(settings, loaded, None, metrics, life)
        if settings.transport == "inproc":
            raise ValueError("--role decode needs --transport grpc or redis")
        _receiver(settings, engine, loaded, life)
        return create_decode_app(metrics, engine.stats, life.readiness, life.start, life.stop, life.liveness)
    if settings.role == "prefill":
        return _front_door(settings, loaded, make_sender(settings), None, metrics, life)
    # role=all: one lock around forward passes so the two engines never oversubscribe the cores.
    lock = threading.Lock()
    engine = _decode_engine(settings, loaded, lock, metrics, life)
    if settings.transport == "inproc":
        sender: KVSender = InprocSender(engine)
    else:
        _receiver(settings, engine, loaded, life)
        sender = _LazySender(lambda: make_sender(settings))
    app = _front_door(settings, loaded, sender, lock, metrics, life)
    app.state.engines["decode"] = engine
    _mix_prompts_into_decode(settings, life.engines["prefill"], engine)
    return app


def _mix_prompts_into_decode(settings: ServeSettings, prefill: EngineLoop, decode: DecodeEngine) -> None:
    """--mixed-prefill-tokens: decode steps compute waiting prompt chunks while requests decode, and the
    prefill engine runs its own passes only while decode is idle (serving/mixing.py)."""
    if settings.mixed_prefill_tokens <= 0:
        return
    if not decode.runner.can_mix or not isinstance(prefill, PrefillEngine):
        log.warning("--mixed-prefill-tokens needs the CPU decode step; prompts get passes of their own")
        return
    decode.chunk_source = prefill.take_chunks
    decode.on_idle = prefill.wake
    prefill.decode_is_busy = decode.is_decoding


class _LazySender(KVSender):
    """Connects on first use, so role=all can start its own receiver before its sender dials it."""

    def __init__(self, factory: Callable[[], KVSender]) -> None:
        self._factory = factory
        self._sender: KVSender | None = None
        self._lock = threading.Lock()

    def _get(self) -> KVSender:
        with self._lock:
            if self._sender is None:
                self._sender = self._factory()
                self.transport_name = self._sender.transport_name
            return self._sender

    def send(self, handoff, sink) -> None:
        self._get().send(handoff, sink)

    def abort(self, request_id: str) -> None:
        self._get().abort(request_id)

    def is_ready(self) -> tuple[bool, str]:
        return self._get().is_ready()

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
