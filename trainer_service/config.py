"""Trainer service settings: a frozen dataclass, read from a TOML file and/or CLI flags.

    tunewire serve trainer --config configs/trainer.example.toml --port 50051
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunewire.devices import DEVICES
from tunewire.security import check_settings


@dataclass(frozen=True)
class TrainerConfig:
    host: str = "127.0.0.1"            # interface for gRPC and metrics
    port: int = 50051                  # gRPC port (0 = pick a free one)
    metrics_port: int = 9091           # Prometheus /metrics HTTP port (0 = off)
    data_dir: str = "var/trainer"      # job store (SQLite) and per-job directories
    data_root: str = "var/data"        # training data may only be read from under here
    model_root: str = "~/.cache/tunewire/models"  # base models may only be read from under here
    adapter_store: str = "var/adapters"  # published adapters: <name>/<version>/ (shared with serving)
    serving_address: str = ""          # host:port of serving for the handoff; "" = publish only
    # (a headless Service's name reaches every replica; or list each replica's, comma-separated)
    max_concurrent_jobs: int = 1       # workers running at once (1 suits a CPU machine)
    max_queued_jobs: int = 100         # queued jobs beyond this are refused (RESOURCE_EXHAUSTED)
    max_worker_retries: int = 2        # a job whose worker dies is resumed this often, then FAILED
    max_upload_bytes: int = 256 << 20  # UploadDataset size limit
    max_dataset_bytes: int = 1 << 30   # larger training/validation files are refused at create
    max_message_bytes: int = 4 << 20   # gRPC message size limit (uploads arrive in chunks)
    worker_threads: int = 0            # torch threads per worker; 0 = all cores
    device: str = "auto"               # workers train on: "auto" (a GPU when they have one), "cpu", "cuda"
    gpus_per_job: int = 1              # GPUs a job gets at least; one rank per GPU, so a job with
                                       # num_processes N takes max(N, gpus_per_job) GPUs (extras idle)
    gpus: str = ""                     # local launcher: GPU ids it hands out, "" = all visible, or "0,1,3";
                                       # no two jobs share a GPU (a job waits for free ones)
    launcher: str = "local"            # "local" subprocesses, or "kubernetes" Jobs / Kubeflow TrainJobs
    worker_report_address: str = ""    # address workers report to ("" = this host); pods: "trainer:50051"
    worker_port: int = 0               # with TLS: plaintext worker-report port (0 = loopback, random)
    k8s_namespace: str = "tunewire"    # kubernetes launcher: where job pods run
    k8s_image: str = "tunewire:cpu"    # kubernetes launcher: worker image
    k8s_gpus_per_pod: int = 0          # kubernetes launcher: GPUs per job pod (0 = CPU pods); a pod
                                       # with N processes gets max(N, this)
    k8s_gpu_resource: str = "nvidia.com/gpu"  # kubernetes launcher: the extended resource of a GPU
    k8s_cpu: str = "2"                 # kubernetes launcher: CPU per job pod (requests = limits)
    k8s_memory: str = "8Gi"            # kubernetes launcher: memory per job pod (requests = limits)
    k8s_node_selector: tuple[str, ...] = ()  # kubernetes launcher: "label=value" job pods need,
                                       # e.g. ["nvidia.com/gpu.present=true"]
    k8s_training_runtime: str = "torch-distributed"  # kubernetes launcher, num_nodes > 1: the Kubeflow
                                       # Trainer runtime of the TrainJob, a ClusterTrainingRuntime's
                                       # name or "TrainingRuntime/<name>" (namespaced)
    cancel_grace_seconds: float = 10.0  # SIGTERM → SIGKILL delay for a worker being stopped
    drain_seconds: float = 2.0         # NOT_SERVING period on SIGTERM before the server stops
    handoff_timeout_seconds: float = 300.0  # deadline of each handoff phase: staging on every
    # serving replica, then every replica serving the recorded deployment
    log_level: str = "INFO"            # Python logging level
    # Security (docs/operations.md "Security"); "" = off. Files, so Kubernetes Secrets can be mounted.
    auth_token_file: str = ""          # clients must send `authorization: Bearer <this file's text>`
    tls_cert_file: str = ""            # PEM server certificate (chain): serve TLS instead of plaintext
    tls_key_file: str = ""             # PEM private key of tls_cert_file
    tls_client_ca_file: str = ""       # PEM CA: clients need a certificate it signed (mTLS)
    health_port: int = 0               # extra plaintext port with only grpc.health.v1 (0 = off)
    serving_tls_ca_file: str = ""      # handoff to serving over TLS, trusting this CA
    serving_tls_cert_file: str = ""    # client certificate for serving's mTLS
    serving_tls_key_file: str = ""     # its private key
    serving_token_file: str = ""       # bearer token sent to serving

    def __post_init__(self):
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("port and metrics_port must be in [0, 65535]")
        if self.max_concurrent_jobs < 1 or self.max_queued_jobs < 1:
            raise ValueError("max_concurrent_jobs and max_queued_jobs must be >= 1")
        if self.max_worker_retries < 0:
            raise ValueError("max_worker_retries must be >= 0")
        if self.launcher not in ("local", "kubernetes"):
            raise ValueError('launcher must be "local" or "kubernetes"')
        if self.worker_threads < 0:
            raise ValueError("worker_threads must be >= 0")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}")
        if self.gpus_per_job < 1 or self.k8s_gpus_per_pod < 0:
            raise ValueError("gpus_per_job must be >= 1 and k8s_gpus_per_pod >= 0")
        if not re.fullmatch(r"[\w-]+(,[\w-]+)*|", self.gpus.replace(" ", "")):
            raise ValueError('gpus must be "" (all visible) or GPU ids like "0,1,3"')
        if not self.k8s_cpu or not self.k8s_memory or "/" not in self.k8s_gpu_resource:
            raise ValueError('k8s_cpu and k8s_memory are required; k8s_gpu_resource is like "nvidia.com/gpu"')
        if any("=" not in s or not s.split("=", 1)[0] for s in self.k8s_node_selector):
            raise ValueError('k8s_node_selector entries are "label=value"')
        if not re.fullmatch(r"(TrainingRuntime/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?", self.k8s_training_runtime):
            raise ValueError('k8s_training_runtime is a runtime name, or "TrainingRuntime/<name>"')
        if self.cancel_grace_seconds < 0 or self.drain_seconds < 0 or self.handoff_timeout_seconds <= 0:
            raise ValueError("grace, drain and handoff timeouts must be positive")
        if not 0 <= self.health_port <= 65535 or (self.health_port and self.health_port == self.port):
            raise ValueError("health_port must be in [0, 65535] and differ from port")
        check_settings(self)
        check_settings(self, "serving_")

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"
