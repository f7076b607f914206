"""Server settings: flags override environment variables (PRAD_*), which override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRETS = ("grpc_secret", "admin_token", "api_key")  # each may come from a file: <name>_file


class ServeSettings(BaseSettings):
    # hide_input_in_errors: a validation error must not print the secrets it was given
    model_config = SettingsConfigDict(env_prefix="PRAD_", extra="forbid", hide_input_in_errors=True)

    role: Literal["all", "prefill", "decode"] = Field(default="all", description="all: prefill and decode in one "
                                                      "process; prefill: the HTTP front door; decode: the engine")
    transport: Literal["inproc", "grpc", "redis"] = Field(default="inproc", description="the prefill -> decode "
                                                          "KV link (inproc: role all only)")
    grpc_host: str = Field(default="127.0.0.1", description="decode role: gRPC bind address")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="decode role: gRPC port")
    decode_addr: str = Field(default="127.0.0.1:50051", description="prefill role: the decode gRPC address")
    grpc_secret: str | None = Field(default=None, description="shared secret sent as x-prad-secret")
    grpc_secret_file: Path | None = Field(default=None, description="file holding grpc_secret (stripped)")
    grpc_tls_cert: str | None = Field(default=None, description="decode role: TLS certificate file (with key)")
    grpc_tls_key: str | None = Field(default=None, description="decode role: TLS private key file (with cert)")
    grpc_tls_ca: str | None = Field(default=None, description="prefill role: CA file that signed decode's "
                                    "certificate (enables TLS)")
    kv_wire_format: Literal["native", "bfloat16", "int8"] = Field(default="native", description="prefill side: "
                                                                  "how KV travels to decode over grpc or redis: "
                                                                  "native (the model's dtype, lossless), bfloat16 "
                                                                  "(lossy, half of fp32) or int8 (lossy, per-head "
                                                                  "per-token scales, ~3.8x smaller than fp32); "
                                                                  "decode rebuilds the model's dtype either way; "
                                                                  "inproc hands tensors over and ignores it")
    kv_stream: bool = Field(default=True, description="prefill side, grpc or redis: send each layer's KV as soon "
                            "as the prompt's last pass computes it, overlapping the transfer with the rest of "
                            "prefill (handoff format version 4); off: the whole KV after the pass (2 or 3)")
    kv_stream_min_tokens: int = Field(default=128, ge=0, description="prefill side: prompts shorter than this "
                                      "are handed over whole even with --kv-stream (too little to overlap)")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="redis:// or rediss:// (password in URL)")
    redis_prefix: str = Field(default="prad:", description="key prefix shared by one deployment")
    kv_ttl_s: float = Field(default=600.0, gt=0, description="Redis: KV blobs expire after this")
    claim_idle_s: float = Field(default=5.0, gt=0, description="Redis: jobs idle this long are taken over")
    replica_lost_s: float | None = Field(default=None, gt=0, description="Redis: a request fails (503) when no "
                                         "decode replica shows life for it this long (unset: claim_idle_s + 3)")
    replica_name: str | None = Field(default=None, description="Redis consumer name (unset: host-pid)")
    model: str | None = Field(default=None, description="local HF model dir (unset: SmolLM2-135M-Instruct)")
    adapters: Path | None = Field(default=None, description="folder of task adapters (one sub-folder per task)")
    host: str = Field(default="127.0.0.1", description="HTTP bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when a GPU is "
                                                   "visible, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description="auto: bfloat16 on "
                                                          "cuda and on CPUs with native bf16 (AVX-512 BF16, AMX), "
                                                          "else float32")
    max_batch_size: int = Field(default=64, ge=1, le=1024, description="decode rows per step")
    max_prefill_batch: int = Field(default=64, ge=1, le=1024, description="prompts per prefill pass")
    max_seq_len: int = Field(default=2048, ge=16, description="prompt + output tokens per request")
    max_kv_tokens: int | None = Field(default=None, ge=16, description="decode KV budget (unset: batch x seq)")
    decode_graphs: Literal["auto", "off", "static"] = Field(default="auto", description="decode step: auto = "
                                                            "static shapes replayed as CUDA graphs on cuda (the "
                                                            "CPU backend on cpu); off = no graphs (the eager "
                                                            "step); static = static shapes, no graphs")
    max_prefill_tokens: int = Field(default=2048, ge=16, description="prompt tokens per prefill pass")
    mixed_prefill_tokens: int = Field(default=0, ge=0, description="role all on a CPU: while requests are "
                                      "decoding, each decode step also computes up to this many waiting prompt "
                                      "tokens in its own pass (one weight read for both), instead of separate "
                                      "prefill passes stalling every stream; 0 = off")
    max_waiting: int = Field(default=256, ge=1, description="queued requests per service before 429")
    max_loaded_adapters: int = Field(default=64, ge=1, description="adapters kept in memory (LRU) per prefill")
    prefix_cache_mb: int = Field(default=256, ge=0, description="prefill: MiB of prompt KV kept for later prompts "
                                 "that start the same way under the same adapter version (0 = off)")
    prefix_cache_block_tokens: int = Field(default=16, ge=1, le=1024, description="prefix cache granularity: a "
                                           "prefix is reused in whole blocks of this many tokens")
    allow_version_pinning: bool = Field(default=False, description="let every client pin an adapter version "
                                        "(\"adapter_version\"); without it only requests carrying the admin "
                                        "token in X-PrAd-Admin-Token may")
    request_timeout_s: float = Field(default=300.0, gt=0, description="a request not finished this long "
                                     "fails (504)")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="decode: on shutdown (SIGTERM), finish "
                                   "running requests for up to this long, taking no new ones, before aborting")
    engine_stall_timeout_s: float = Field(default=60.0, gt=0, description="an engine that makes no progress "
                                          "this long while work waits fails /healthz (restart it)")
    exit_when_unhealthy_s: float | None = Field(default=None, gt=0, description="exit (code 70) after /healthz "
                                                "has failed this long, for supervisors that restart on exit only")
    threads: int | None = Field(default=None, ge=1, description="torch threads (unset: free cores)")
    log_level: str = Field(default="info", description="debug, info, warning, error or critical")
    log_format: Literal["text", "json"] = Field(default="text", description="json: one object per line, "
                                                "with request id, task and adapter version")
    api_key: str | None = Field(default=None, description="bearer token required on /generate, /tasks, /v1/*")
    api_key_file: Path | None = Field(default=None, description="file holding api_key (stripped)")
    admin_token: str | None = Field(default=None, description="bearer token for /admin; unset: no admin routes")
    admin_token_file: Path | None = Field(default=None, description="file holding admin_token (stripped)")
    http_header_timeout_s: float = Field(default=10.0, gt=0, description="a connection that has not sent a "
                                         "request's complete headers this long after it opened or the request "
                                         "began is closed (408): slow clients cannot hold connections")
    http_body_timeout_s: float = Field(default=60.0, gt=0, description="a request body not complete this long "
                                       "after its headers is refused (408)")
    http_keep_alive_s: float = Field(default=5.0, gt=0, description="idle keep-alive connections close after this")
    store: Path | None = Field(default=None, description="versioned adapter store folder (unset: a temp dir)")
    store_redis_url: str | None = Field(default=None, description="Redis index for a store shared by many nodes")
    max_adapter_bytes: int = Field(default=256 << 20, ge=1024, description="upload limit for adapter weights")
    adapter_poll_s: float = Field(default=1.0, gt=0, description="fallback poll of the store for changes")
    max_task_labels: int = Field(default=100, ge=1, description="per-task metric labels before 'other'")

    @model_validator(mode="after")
    def _secrets_from_files(self) -> ServeSettings:
        """<secret>_file: the file's content (stripped) becomes the secret; giving both is an error."""
        for name in SECRETS:
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is given both as a value and as a file ({path}): give one")
            try:
                secret = path.read_text().strip()
            except OSError as e:
                raise ValueError(f"cannot read {name}_file {path}: {e}") from e
            if not secret:
                raise ValueError(f"{name}_file {path} is empty")
            setattr(self, name, secret)
        return self

    @property
    def kv_budget(self) -> int:
        return self.max_kv_tokens or self.max_batch_size * self.max_seq_len
