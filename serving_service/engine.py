"""A small asyncio wrapper around vLLM's AsyncLLM, and the engine's settings (`EngineConfig`).

What: `VllmEngine` starts one AsyncLLM with LoRA enabled, keeps the set of adapters registered
through `add_lora`, and streams generations as `Delta`s (text since the previous piece, token
counts, finish reason, time queued). Plain-Python types in and out (`EngineConfig`, `GenParams`,
`Delta`, `EngineError`), so the rest of the request path never touches vLLM: of serving's
modules only this one and the CPU LoRA plugin (cpu_lora*.py, which patches vLLM's own code)
import vllm. The facts about vLLM's LoRA support that others check against (`LORA_RANKS`,
`LORA_TARGETS`, `wrapped_targets`) live here too.

    engine = VllmEngine(EngineConfig(model="/models/tiny", enforce_eager=True))
    await engine.start()
    await engine.add_lora("extract@v1", 1, "/adapters/extract/v1")
    async for delta in engine.generate("req-1", prompt, GenParams(max_tokens=32), ("extract@v1", 1, path)): ...

How it runs: `prepare()` imports vLLM (before a server listens: the import starves other
threads), `await engine.start()` builds the AsyncLLM in a worker thread; its output handler binds
to the loop of the first request (call every coroutine from one loop). It runs on a GPU when
torch sees one (`engine_device`), in the `dtype` setting resolved there (`serving_dtype`);
`engine_args` makes vLLM's AsyncEngineArgs. The engine core is a separate process; on CPU the
LoRA fix in `serving_service/cpu_lora.py` reaches it as a vLLM plugin. If it dies, `death()`
says why (engine_death.py), `wait_dead()` returns, and every call raises `EngineDead`.

Guards:
  * generate() only accepts adapters registered with add_lora: a request naming a path vLLM cannot
    load kills the whole engine (EngineDeadError), whereas add_lora with a bad path only raises.
  * stopping iteration early (client cancel) aborts the engine request.
  * JSON whitespace is disabled engine-wide (the per-request flag is ignored by vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving_service.engine_death import DEATH_POLL_S, death_of
from tunewire import devices

log = logging.getLogger(__name__)

# What vLLM 0.32 accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Projections vLLM can put LoRA on (Llama-style names, as in peft's target_modules).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM packs q/k/v and gate/up into one layer each: wrapping one member wraps the whole layer.
PACKED_TARGETS = (frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}))
# The `dtype` setting's values: "auto" or a vLLM dtype name (devices.DTYPE_NAMES is their one home).
DTYPES = ("auto", *devices.DTYPE_NAMES.values())
# Not settings: structured.py pre-compiles every constraint with llguidance exactly as the
# guidance backend will, so the backend is a fact of this code, not a choice.
STRUCTURED_BACKEND = "guidance"
SEED = 0


class EngineError(Exception):
    """The engine could not do what was asked (bad adapter, engine dead, internal error)."""


class EngineDead(EngineError):
    """The engine died (its core process exited, or vLLM raised EngineDeadError): nothing more
    runs on it; the serving process exits so that it is restarted."""


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; serving's ServingConfig extends it, so each is defined and checked
    here once. Construction raises ValueError naming the setting."""
    model: str = ""                  # HF model directory (config, weights, tokenizer); required
    max_model_len: int = 2048        # context length: prompt + completion tokens per sequence
    max_loras: int = 4               # distinct adapters in one engine batch
    max_lora_rank: int = 16          # largest adapter rank accepted; one of LORA_RANKS
    max_cpu_loras: int = 8           # adapters kept registered with the engine; >= max_loras
    max_num_seqs: int = 32           # sequences in one engine batch
    kv_cache_gib: int = 1            # VLLM_CPU_KVCACHE_SPACE when unset (the CPU backend needs it)
    enforce_eager: bool = False      # skip torch.compile/graphs: faster start, slower decode
    cpu_lora_compile: bool = True    # CPU: keep torch.compile on under LoRA (vLLM turns it off;
                                     # serving_service/cpu_lora_compile.py); off with enforce_eager
    lora_target_modules: tuple[str, ...] = ()  # wrap only these projections for LoRA (() = all
                                     # of LORA_TARGETS); fewer wrapped = faster, adapters
                                     # targeting others are refused
    dtype: str = "auto"              # weights and activations: auto (bfloat16 on a GPU that has
                                     # it, float32 on a CPU: faster there, and equal to the HF
                                     # references), float32, bfloat16 or float16
    gpu_memory_utilization: float = 0.9  # GPU: share of each GPU's memory vLLM takes (weights,
                                     # activations, KV cache); the rest holds this process's CUDA
                                     # context and the Classify body. Ignored on a CPU (kv_cache_gib)
    tensor_parallel_size: int = 1    # GPUs one replica splits the model over (a divisor of its
                                     # attention heads)
    enable_prefix_caching: bool = True  # reuse the KV cache of a prompt prefix already computed
                                     # (same adapter only); vLLM's default on GPU and CPU alike
    max_num_batched_tokens: int = 0  # tokens per engine step (prefill chunks + decodes); more =
                                     # throughput, less = latency; 0 = vLLM's default for the device

    def __post_init__(self):
        # TOML gives a list; "~" in a model path is the user's home, as in a shell
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "model", str(Path(self.model).expanduser()) if self.model else "")
        bad_targets = sorted(set(self.lora_target_modules) - set(LORA_TARGETS))
        checks = [
            (bool(self.model), "model is required (a Hugging Face model directory)"),
            (self.max_model_len >= 16, "max_model_len must be >= 16"),
            (self.max_loras >= 1, "max_loras must be >= 1"),
            (self.max_lora_rank in LORA_RANKS, f"max_lora_rank must be one of vLLM's {LORA_RANKS}"),
            (self.max_cpu_loras >= self.max_loras, "max_cpu_loras must be >= max_loras"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.kv_cache_gib >= 1, "kv_cache_gib must be >= 1"),
            (not bad_targets, f"lora_target_modules: {bad_targets} not among {list(LORA_TARGETS)}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, not {self.dtype!r}"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            # vLLM's own rule: a step must have room for one token of every sequence
            (self.max_num_batched_tokens == 0 or self.max_num_batched_tokens >= self.max_num_seqs,
             "max_num_batched_tokens must be 0 (vLLM's default) or >= max_num_seqs"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def engine_device() -> str:
    """"cuda" when this process sees a GPU, else "cpu": where vLLM runs (its platform is CUDA
    exactly when torch sees a GPU) and where Classify's body goes. Selecting the GPU initialises
    CUDA in this process; vLLM then starts its engine core with spawn instead of fork."""
    return devices.resolve_device("auto").type


def serving_dtype(setting: str, device: str) -> str:
    """The vLLM dtype name the engine serves in: an explicit setting as it is; "auto" through
    devices.resolve_precision (bfloat16 on a GPU with bf16, else float32)."""
    if setting != "auto":
        return setting
    import torch

    return devices.DTYPE_NAMES[devices.precision_name(
        devices.resolve_precision("auto", torch.device(device)))]


def engine_args(cfg: EngineConfig, device: str) -> dict[str, Any]:
    """vLLM's AsyncEngineArgs keywords for these settings on `device` ("cpu" or "cuda").
    gpu_memory_utilization only goes to a GPU engine: the CPU backend would read it as a share
    of host memory, which kv_cache_gib already fixes."""
    c = cfg
    args: dict[str, Any] = dict(
        model=c.model, dtype=serving_dtype(c.dtype, device), max_model_len=c.max_model_len,
        seed=SEED, max_num_seqs=c.max_num_seqs, enforce_eager=c.enforce_eager,
        enable_lora=True, max_loras=c.max_loras, max_lora_rank=c.max_lora_rank,
        max_cpu_loras=c.max_cpu_loras, lora_target_modules=list(c.lora_target_modules) or None,
        tensor_parallel_size=c.tensor_parallel_size, enable_prefix_caching=c.enable_prefix_caching,
        max_num_batched_tokens=c.max_num_batched_tokens or None,
        disable_log_stats=False,
        structured_outputs_config={"backend": STRUCTURED_BACKEND, "disable_any_whitespace": True},
    )
    if device == "cuda":
        args["gpu_memory_utilization"] = c.gpu_memory_utilization
    return args


def wrapped_targets(deployed: tuple[str, ...]) -> frozenset[str]:
    """The projections an adapter may target when the engine wraps only `deployed` (() = all)."""
    if not deployed:
        return frozenset(LORA_TARGETS)
    out = set(deployed)
    for group in PACKED_TARGETS:
        if out & group:
            out |= group
    return frozenset(out)


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    seed: int | None = None          # per-request sampling seed
    stop: tuple[str, ...] = ()       # stop strings (not included in the output)
    min_tokens: int = 0              # neither EOS nor a stop string ends the output before this
    json_schema: dict | None = None  # constrain the output to this JSON schema
    json_object: bool = False        # constrain the output to any JSON object
    regex: str = ""                  # constrain the whole output to this regular expression
    choices: tuple[str, ...] = ()    # constrain the output to exactly one of these strings

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if sum([self.json_schema is not None, self.json_object, bool(self.regex), bool(self.choices)]) > 1:
            raise ValueError("json_schema, json_object, regex and choices are exclusive")


@dataclass
class Delta:
    """One streamed piece of a generation."""
    text: str                        # new text since the previous Delta
    prompt_tokens: int
    completion_tokens: int           # cumulative
    finish_reason: str | None        # None until the last Delta; then "stop" | "length" | "abort"
    queue_ms: float | None = None    # time queued in the engine (last Delta only, if known)
    token_ids: tuple[int, ...] = ()  # the new completion token ids behind `text`


class VllmEngine:
    def __init__(self, cfg: EngineConfig, device: str | None = None):
        self.cfg = cfg
        self.device = device                   # "cpu" | "cuda"; None = engine_device() at start
        self._engine: Any = None               # vllm AsyncLLM once started
        self._loras: dict[int, tuple[str, str]] = {}   # lora_id -> (name, path), registered
        self._dead = ""                        # why the engine died ("" = it has not)

    async def start(self) -> None:
        """Build the AsyncLLM (LoRA on, log_stats on so the `vllm:*` Prometheus metrics register
        in prometheus_client's default REGISTRY). The loop keeps running while the engine core
        starts (~25-90 s on CPU). vLLM spawns processes: a script calling this needs a __main__ guard."""
        if self._engine is not None:
            return
        self.device = self.device or engine_device()
        t0 = time.monotonic()
        try:
            # In a thread: the gRPC server on this loop keeps answering health checks (NOT_SERVING)
            # meanwhile. AsyncLLM starts its output handler on the first request, in this loop.
            self._engine, dtype = await asyncio.to_thread(self._build)
        except Exception as e:
            raise EngineError(f"vLLM engine failed to start: {e}") from e
        log.info("vLLM engine started in %.1f s (model=%s, device=%s, dtype=%s)",
                 time.monotonic() - t0, self.cfg.model, self.device, dtype)

    def prepare(self) -> None:
        """Sets vLLM's environment and imports vLLM (~5 s on 2 cores), before a server listens:
        the import holds the GIL for 100-300 ms at a time (pydantic schemas, torch op
        registration), starving the event loop's thread. `start` calls it too (then it is free)."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        # Read by the CPU LoRA plugin in every vLLM process (children inherit the environment);
        # re-registered here because this process may have loaded the plugins already.
        compile_ = self.cfg.cpu_lora_compile and not self.cfg.enforce_eager
        os.environ["TUNEWIRE_CPU_LORA_COMPILE"] = "1" if compile_ else "0"
        from serving_service import cpu_lora

        cpu_lora.register()
        import vllm.engine.arg_utils  # noqa: F401
        import vllm.v1.engine.async_llm  # noqa: F401

    def _build(self):
        """(AsyncLLM, its dtype): runs in a worker thread, off the event loop."""
        self.prepare()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args(self.cfg, self.device))
        return AsyncLLM.from_engine_args(args), args.dtype

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self.death()

    def death(self) -> str:
        """Why the engine is dead (engine_death.death_of), "" while it lives, before it started
        and after `shutdown`. Once dead, always dead."""
        if not self._dead and self._engine is not None:
            self._dead = death_of(self._engine)
        return self._dead

    async def wait_dead(self, poll_s: float = DEATH_POLL_S) -> str:
        """Returns (why) once the started engine dies; never returns while it lives. Polls
        `death`: two attribute reads and one non-blocking wait per process."""
        while not (why := self.death()):
            await asyncio.sleep(poll_s)
        log.error("vLLM engine died: %s", why)
        return why

    def tokenizer(self):
        """The HF tokenizer the engine uses (for chat templates)."""
        return self._require().get_tokenizer()

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        """Load an adapter into the engine and register it; raises EngineError on failure."""
        from vllm.lora.request import LoRARequest

        engine = self._require()
        if lora_id < 1:
            raise EngineError(f"lora_id must be >= 1, got {lora_id}")
        if lora_id in self._loras:
            if self._loras[lora_id] == (name, path):
                return
            raise EngineError(f"lora_id {lora_id} is already registered as {self._loras[lora_id]}")
        if not (Path(path) / "adapter_config.json").is_file():
            raise EngineError(f"no adapter_config.json in {path!r}")
        try:
            await engine.add_lora(LoRARequest(name, lora_id, path))
        except Exception as e:
            raise EngineError(f"could not load adapter {name!r} from {path!r}: {e}") from e
        self._loras[lora_id] = (name, path)

    async def remove_lora(self, lora_id: int) -> None:
        engine = self._require()
        if self._loras.pop(lora_id, None) is None:
            raise EngineError(f"lora_id {lora_id} is not registered")
        try:
            await engine.remove_lora(lora_id)
        except Exception as e:
            raise EngineError(f"could not remove adapter {lora_id}: {e}") from e

    async def generate(self, request_id: str, prompt: str, params: GenParams,
                       lora: tuple[str, int, str] | None) -> AsyncIterator[Delta]:
        """Stream the completion of `prompt` as Deltas. `lora` = (name, id, path) must have been
        registered with add_lora, else EngineError before anything reaches the engine. Raises
        ValueError for invalid requests (e.g. prompt too long), EngineError for engine failures."""
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        engine = self._require()
        lora_request = None
        if lora is not None:
            name, lora_id, path = lora
            if self._loras.get(lora_id) != (name, path):
                raise EngineError(f"adapter {lora!r} is not registered (add_lora first)")
            if not Path(path).is_dir():  # evicted adapters are reloaded from disk: it must exist
                raise EngineError(f"adapter directory {path!r} is gone")
            lora_request = LoRARequest(name, lora_id, path)
        structured = None
        if params.json_schema is not None:
            structured = StructuredOutputsParams(json=params.json_schema)
        elif params.json_object:
            structured = StructuredOutputsParams(json_object=True)
        elif params.regex:
            structured = StructuredOutputsParams(regex=params.regex)
        elif params.choices:
            structured = StructuredOutputsParams(choice=list(params.choices))
        sampling = SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, seed=params.seed, stop=list(params.stop) or None,
            min_tokens=params.min_tokens, structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA)

        stream = engine.generate(prompt, sampling, request_id=request_id,
                                 lora_request=lora_request)
        finished, completion_tokens = False, 0
        try:
            async for out in stream:
                piece = out.outputs[0]
                completion_tokens += len(piece.token_ids)
                finish = piece.finish_reason if out.finished else None
                if finish == "error":
                    self._raise_if_dead(request_id)
                    raise EngineError(f"request {request_id} failed inside the engine")
                if finish == "repetition":
                    finish = "stop"
                finished = out.finished
                yield Delta(text=piece.text, prompt_tokens=len(out.prompt_token_ids or ()),
                            completion_tokens=completion_tokens, finish_reason=finish,
                            queue_ms=_queue_ms(out) if out.finished else None,
                            token_ids=tuple(piece.token_ids))
        except (ValueError, EngineError):
            raise
        except Exception as e:  # EngineDeadError, ... (CancelledError is not an Exception)
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(e, EngineDeadError) and not self.death():  # before vLLM's monitor saw it
                self._dead = "vLLM raised EngineDeadError"
            self._raise_if_dead(request_id)
            raise EngineError(f"generation {request_id} failed: {e}") from e
        finally:
            if not finished:  # consumer stopped early (cancel) or error: free the engine slot
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
                await stream.aclose()

    def unfinished_requests(self) -> int:
        """Requests the engine still tracks (queued or running); 0 when idle. Aborts and
        deadlines must bring this back to 0: a leak here is a leaked KV-cache slot."""
        if self._engine is None:
            return 0
        return self._engine.output_processor.get_num_unfinished_requests()

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def shutdown(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.shutdown()

    def _require(self):
        if self._engine is None:
            raise EngineError("engine not started")
        self._raise_if_dead()
        return self._engine

    def _raise_if_dead(self, request_id: str = "") -> None:
        if why := self.death():
            raise EngineDead(f"{request_id}: {why}" if request_id else why)


def _queue_ms(out) -> float | None:
    """Engine-core time from queued to first scheduled (RequestOutput.metrics, log_stats on)."""
    m = getattr(out, "metrics", None)
    queued, scheduled = getattr(m, "queued_ts", 0.0), getattr(m, "scheduled_ts", 0.0)
    if not queued or not scheduled:
        return None
    return max(0.0, (scheduled - queued) * 1000.0)
