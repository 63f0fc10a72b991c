"""Serving service settings: a frozen dataclass, read from a TOML file and/or CLI flags.

    tunewire serve serving --model /path/to/hf-model [--config configs/serving.example.toml]
"""

from __future__ import annotations

from dataclasses import dataclass

from tunewire.security import check_settings

# Projections vLLM can put LoRA on (Llama-style names, as in peft's target_modules).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ServingConfig:
    model: str = ""                    # HF model directory to serve (required)
    host: str = "127.0.0.1"            # interface for gRPC and metrics
    port: int = 50052                  # gRPC port (0 = pick a free one)
    metrics_port: int = 9092           # Prometheus /metrics HTTP port (0 = off)
    adapter_store: str = "var/adapters"  # adapters may only be loaded from under this directory
    max_model_len: int = 2048          # context length (prompt + completion tokens)
    max_loras: int = 4                 # adapters in one engine batch
    max_lora_rank: int = 16            # largest adapter rank accepted
    max_cpu_loras: int = 8             # adapters kept resident by the engine
    max_num_seqs: int = 32             # sequences in one engine batch
    kv_cache_gib: int = 1              # VLLM_CPU_KVCACHE_SPACE when unset (CPU only)
    enforce_eager: bool = False        # skip torch.compile/graphs: faster start, slower decode
    cpu_lora_compile: bool = True      # CPU: keep torch.compile on under LoRA (vLLM turns it off)
    lora_target_modules: tuple[str, ...] = ()  # wrap only these projections (() = all); adapters
                                       # targeting others are refused. Fewer wrapped = faster
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
    # Security (README "Security"); "" = off. Files, so Kubernetes Secrets can be mounted.
    auth_token_file: str = ""          # clients must send `authorization: Bearer <this file's text>`
    tls_cert_file: str = ""            # PEM server certificate (chain): serve TLS instead of plaintext
    tls_key_file: str = ""             # PEM private key of tls_cert_file
    tls_client_ca_file: str = ""       # PEM CA: clients need a certificate it signed (mTLS)
    health_port: int = 0               # extra plaintext port with only grpc.health.v1 (0 = off)

    def __post_init__(self):
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))  # TOML: list
        bad = set(self.lora_target_modules) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"lora_target_modules: {sorted(bad)} not among {list(LORA_TARGETS)}")
        if not self.model:
            raise ValueError("model is required (a Hugging Face model directory)")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("port and metrics_port must be in [0, 65535]")
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError("max_lora_rank must be one of vLLM's sizes: 1, 8, 16, 32, 64, ...")
        for name in ("max_model_len", "max_loras", "max_cpu_loras", "max_num_seqs", "kv_cache_gib",
                     "default_max_tokens", "max_concurrent_requests", "max_schema_bytes",
                     "metrics_top_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.max_queued_requests < 0 or self.max_concurrent_per_adapter < 0:
            raise ValueError("max_queued_requests and max_concurrent_per_adapter must be >= 0")
        if self.schema_compile_timeout_s <= 0 or self.retry_after_s < 0:
            raise ValueError("schema_compile_timeout_s must be > 0 and retry_after_s >= 0")
        if self.default_max_tokens > self.max_model_len:
            raise ValueError("default_max_tokens must be <= max_model_len")
        if not 0 <= self.health_port <= 65535 or (self.health_port and self.health_port == self.port):
            raise ValueError("health_port must be in [0, 65535] and differ from port")
        check_settings(self)
