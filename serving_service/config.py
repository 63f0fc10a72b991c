"""Serving service settings: a frozen dataclass, read from a TOML file and/or CLI flags.

    tunewire serve serving --model /path/to/hf-model [--config configs/serving.example.toml]

`ServingConfig` extends the engine's `EngineConfig` (serving_service/engine.py: model, context
length, LoRA limits, batch size, compile switches), so each engine setting, its default and its
check are written once, there; the fields below are what the service adds around the engine.
`cfg.engine_config()` is the engine's part, as `VllmEngine` takes it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields

from serving_service.engine import EngineConfig
from tunewire.security import check_settings


@dataclass(frozen=True)
class ServingConfig(EngineConfig):
    host: str = "127.0.0.1"            # interface for gRPC and metrics
    port: int = 50052                  # gRPC port (0 = pick a free one)
    metrics_port: int = 9092           # Prometheus /metrics HTTP port (0 = off)
    adapter_store: str = "var/adapters"  # adapters may only be loaded from under this directory
    default_max_tokens: int = 256      # when a request leaves max_tokens at 0
    max_concurrent_requests: int = 64  # requests admitted to the engine at once
    max_queued_requests: int = 256     # more wait in our queue; past that RESOURCE_EXHAUSTED
    max_concurrent_per_adapter: int = 0  # cap per adapter so a hot one cannot starve others (0 = off)
    retry_after_s: float = 1.0         # RetryInfo hint sent with RESOURCE_EXHAUSTED
    lazy_load: bool = True             # a request for a store adapter that is not resident loads it
    max_schema_bytes: int = 65536      # larger response-format schemas are refused
    schema_compile_timeout_s: float = 2.0  # grammar compile budget per schema (cached afterwards)
    metrics_top_adapters: int = 20     # adapters with their own metric label; the rest are "other"
    max_prompt_chars: int = 200_000    # longer prompts are refused before tokenizing
    max_message_bytes: int = 4 << 20   # gRPC message size limit
    drain_seconds: float = 2.0         # NOT_SERVING period on SIGTERM before the server stops
    log_level: str = "INFO"            # Python logging level
    # Security (tunewire/security.py); "" = off. Files, so Kubernetes Secrets can be mounted.
    auth_token_file: str = ""          # clients must send `authorization: Bearer <this file's text>`
    tls_cert_file: str = ""            # PEM server certificate (chain): serve TLS instead of plaintext
    tls_key_file: str = ""             # PEM private key of tls_cert_file
    tls_client_ca_file: str = ""       # PEM CA: clients need a certificate it signed (mTLS)
    health_port: int = 0               # extra plaintext port with only grpc.health.v1 (0 = off)
    # The OpenAI-compatible HTTP API (serving_service/openai_http.py): same engine, admission,
    # adapters, token and TLS as gRPC, on its own port
    http_port: int = 0                 # /v1/chat/completions, /v1/completions, /v1/models (0 = off)
    served_model_name: str = ""        # the base model's `model` name over HTTP; "" = the model directory's name
    # Deployments across replicas (serving_service/deployment_sync.py)
    deployment_poll_seconds: float = 0.25  # how often the store's deployment record is checked:
    # it bounds how far this replica lags behind a deployment another replica or the trainer made
    replica_id: str = ""               # this replica's name in GetModelInfo; "" = $POD_NAME, else the host name

    def __post_init__(self):
        super().__post_init__()  # the engine's settings
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("port and metrics_port must be in [0, 65535]")
        for name in ("default_max_tokens", "max_concurrent_requests", "max_schema_bytes",
                     "metrics_top_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queued_requests < 0 or self.max_concurrent_per_adapter < 0:
            raise ValueError("max_queued_requests and max_concurrent_per_adapter must be >= 0")
        if self.schema_compile_timeout_s <= 0 or self.retry_after_s < 0:
            raise ValueError("schema_compile_timeout_s must be > 0 and retry_after_s >= 0")
        if self.default_max_tokens > self.max_model_len:
            raise ValueError("default_max_tokens must be <= max_model_len")
        if not 0 <= self.health_port <= 65535 or (self.health_port and self.health_port == self.port):
            raise ValueError("health_port must be in [0, 65535] and differ from port")
        if not 0 <= self.http_port <= 65535 or (self.http_port and self.http_port in (
                self.port, self.health_port, self.metrics_port)):
            raise ValueError("http_port must be in [0, 65535] and differ from port, health_port and metrics_port")
        if not 0 < self.deployment_poll_seconds <= 60:
            raise ValueError("deployment_poll_seconds must be in (0, 60]")
        check_settings(self)

    def replica_name(self) -> str:
        """replica_id, else the pod's name (Kubernetes' downward API sets POD_NAME), else the host's."""
        return self.replica_id or os.environ.get("POD_NAME", "") or socket.gethostname()

    def base_model_name(self) -> str:
        """What `model` names the base model as over HTTP (GET /v1/models lists it)."""
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    def engine_config(self) -> EngineConfig:
        """The engine's settings out of these (already checked)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})
