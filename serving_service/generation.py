"""Generation on the engine: request checks, admission, adapter routing, constrained output,
deadlines and per-adapter accounting.

`Generator.stream` is the one path for `Generate`, `BatchGenerate` and `StreamGenerate`:
  1. validate the request (prompt or chat messages, sampling ranges) and prepare its output
     constraint (schema checked and compiled with a timeout; see structured.py);
  2. wait for an admission slot (bounded queue, per-adapter fairness; see admission.py);
  3. resolve the adapter through the registry (loading it if it is only in the store);
  4. run the engine, with a watchdog that aborts the engine request at the deadline (the gRPC
     deadline or `time_limit_ms`, the earlier); a client that goes away cancels this coroutine,
     and the engine wrapper aborts the request on the way out;
  5. on the last chunk report timings, the version used, and whether structured output validated.
Per-adapter metrics live here because vLLM's own metrics have no adapter label; label values are
bounded (`LabelLimiter`) so a thousand adapters cannot blow up Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from serving_service.adapter_checks import parse_ref
from serving_service.admission import Admission
from serving_service.engine import EngineDead, GenParams
from serving_service.registry import AdapterRegistry
from serving_service.structured import STRUCTURED, StructuredOutputs, check_output
from tunewire import reasons as R
from tunewire.chat import ROLES, render_prompt
from tunewire.errors import TunewireError, invalid

# `frontend` is the API the request came through (FRONTENDS): one engine serves both.
REQUESTS = Counter("tunewire_serving_requests_total", "Generation requests by adapter, outcome and front end.",
                   ["adapter", "outcome", "frontend"])
TTFT = Histogram("tunewire_serving_ttft_seconds", "Time to first token.", ["adapter", "frontend"],
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
LATENCY = Histogram("tunewire_serving_e2e_latency_seconds", "End-to-end generation latency.",
                    ["adapter", "frontend"], buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
TOKENS = Counter("tunewire_serving_tokens_total", "Prompt and completion tokens.", ["adapter", "kind", "frontend"])
FRONTENDS = ("grpc", "http")  # ServingService over gRPC; the OpenAI-compatible HTTP API
MAX_BATCH = 64  # requests in one BatchGenerate, prompts x n in one HTTP completion


class LabelLimiter:
    """Bounded metric labels: the first `k` adapter names keep their own label, later ones
    share "other" (base requests are always "base")."""

    def __init__(self, k: int):
        self.k, self._names = k, set()

    def __call__(self, name: str) -> str:
        if not name:
            return "base"
        if name in self._names:
            return name
        if len(self._names) < self.k:
            self._names.add(name)
            return name
        return "other"


@dataclass(frozen=True)
class GenerationRequest:
    adapter: str = ""                             # "" = base model; "name" or "name@version"
    prompt: str = ""                              # raw prompt, or:
    messages: tuple[tuple[str, str], ...] = ()    # (role, content) rendered by the chat template
    max_tokens: int = 0                           # 0 = the server default
    temperature: float = 0.0                      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                                # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0                           # no EOS / stop string before this many tokens
    response_format: str = "text"                 # text | json_object | json_schema | regex | choice
    json_schema: str = ""                         # schema text for json_schema
    strict: bool = False                          # json_schema: reject keywords the backend cannot enforce
    regex: str = ""
    choices: tuple[str, ...] = ()
    request_id: str = ""
    time_limit_ms: int = 0                        # 0 = none
    deadline: float | None = None                 # time.monotonic() of the gRPC deadline, if any
    frontend: str = "grpc"                        # one of FRONTENDS: the metrics' label


@dataclass
class Chunk:
    text: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str = ""
    adapter_version: str = ""
    request_id: str = ""
    finish_reason: str | None = None              # set on the last chunk
    timings: dict[str, float] = field(default_factory=dict)
    structured_output_valid: bool = False
    structured_output_error: str = ""
    warnings: tuple[str, ...] = ()                # first chunk only


class Generator:
    def __init__(self, engine, registry: AdapterRegistry, structured: StructuredOutputs,
                 admission: Admission, *, default_max_tokens: int, max_model_len: int,
                 top_adapters: int = 20, max_prompt_chars: int = 200_000):
        self.engine, self.registry = engine, registry
        self.structured, self.admission = structured, admission
        self.default_max_tokens, self.max_model_len = default_max_tokens, max_model_len
        self.label = LabelLimiter(top_adapters)
        self.max_prompt_chars = max_prompt_chars

    def _check(self, req: GenerationRequest) -> int:
        """Validates the sampling fields; returns max_tokens."""
        if bool(req.prompt) == bool(req.messages):
            raise invalid("prompt", "exactly one of prompt and messages is required")
        if len(req.prompt) + sum(len(c) for _, c in req.messages) > self.max_prompt_chars:
            raise TunewireError(R.PROMPT_TOO_LONG, f"the prompt is over {self.max_prompt_chars} characters",
                                field_violations={"prompt": "longer than max_prompt_chars"})
        for i, (role, _) in enumerate(req.messages):
            if role not in ROLES:
                raise invalid(f"messages[{i}].role", f"must be one of {ROLES}")
        max_tokens = req.max_tokens or self.default_max_tokens
        if not 1 <= max_tokens <= self.max_model_len:
            raise invalid("sampling.max_tokens", f"must be in [1, {self.max_model_len}]")
        if not 0 <= req.temperature <= 2:
            raise invalid("sampling.temperature", "must be in [0, 2]")
        if not 0 < req.top_p <= 1:
            raise invalid("sampling.top_p", "must be in (0, 1]")
        if req.top_k < 0:
            raise invalid("sampling.top_k", "must be >= 0")
        if len(req.stop) > 16 or any(not s for s in req.stop):
            raise invalid("sampling.stop", "at most 16 non-empty strings")
        if not 0 <= req.min_tokens <= max_tokens:
            raise invalid("sampling.min_tokens", f"must be in [0, max_tokens = {max_tokens}]")
        if req.time_limit_ms < 0:
            raise invalid("time_limit_ms", "must be >= 0")
        if req.adapter:
            parse_ref(req.adapter)
        return max_tokens

    def tokenize(self, adapter: str, text: str) -> list[tuple[int, str, int, int]]:
        """(id, token text, start, end) for each token of `text`, offsets into `text`."""
        _check_engine(self.engine)
        if adapter:  # adapters share the base tokenizer; an unknown one is NOT_FOUND like Generate
            self.registry.check_known(adapter)
        enc = self.engine.tokenizer()(text, return_offsets_mapping=True)
        return [(i, text[a:b], a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]

    async def complete(self, req: GenerationRequest) -> Chunk:
        """The whole completion as one Chunk (Generate / BatchGenerate)."""
        parts, last = [], None
        async for c in self.stream(req):
            parts.append(c.text)
            last = c if last is None else _merge(last, c)
        last.text = "".join(parts)
        return last

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        _check_engine(self.engine)
        # Metric label: "base", or the adapter's name once it resolved (bounded by LabelLimiter);
        # names that never resolve are "unknown", so random names cannot mint labels.
        label = "unknown" if req.adapter else "base"
        started = time.perf_counter()
        outcome = "error"
        try:
            max_tokens = self._check(req)
            c = await self.structured.prepare(req.response_format, schema=req.json_schema,
                                              strict=req.strict, regex=req.regex, choices=req.choices)
            params = GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                               top_k=req.top_k, seed=req.seed, stop=tuple(req.stop),
                               min_tokens=req.min_tokens,
                               json_schema=c.engine_schema if c.kind == "json_schema" else None,
                               json_object=c.kind == "json_object", regex=c.regex, choices=c.choices)
            deadline = req.deadline
            if req.time_limit_ms:
                limit = time.monotonic() + req.time_limit_ms / 1000
                deadline = limit if deadline is None else min(deadline, limit)
            prompt = req.prompt or render_prompt(self.engine.tokenizer(),
                                                 [{"role": r, "content": t} for r, t in req.messages])
            n_prompt = len(self.engine.tokenizer().encode(prompt))
            if n_prompt + max_tokens > self.max_model_len:
                raise TunewireError(R.PROMPT_TOO_LONG,
                                    f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds "
                                    f"the context length {self.max_model_len}",
                                    field_violations={"prompt": "too long for max_model_len"})
            rid = req.request_id or uuid.uuid4().hex
            async with self.admission.slot(req.adapter.partition("@")[0], deadline) as queued_ms:
                adapter_ctx = self.registry.using(req.adapter) if req.adapter else _no_adapter()
                async with adapter_ctx as (adapter, load_ms):
                    if adapter:
                        label = self.label(adapter.name)
                    lora = (adapter.key, adapter.lora_id, str(adapter.path)) if adapter else None
                    first, parts = None, []
                    watchdog = _Watchdog(self.engine, rid, deadline)
                    try:
                        async for d in self.engine.generate(rid, prompt, params, lora):
                            if d.finish_reason == "abort" and watchdog.fired:
                                raise TunewireError(R.DEADLINE_EXCEEDED,
                                                    "the deadline passed while generating; the engine "
                                                    "request was aborted")
                            if first is None and (d.text or d.completion_tokens):
                                first = time.perf_counter()
                                TTFT.labels(label, req.frontend).observe(first - started)
                            chunk = Chunk(text=d.text, prompt_tokens=d.prompt_tokens,
                                          completion_tokens=d.completion_tokens, request_id=rid,
                                          adapter=adapter.name if adapter else "",
                                          adapter_version=adapter.version if adapter else "",
                                          warnings=c.warnings if not parts else ())
                            parts.append(d.text)
                            if d.finish_reason is not None:
                                end = time.perf_counter()
                                chunk.finish_reason = d.finish_reason
                                chunk.timings = {"ttft_ms": 1000 * ((first or end) - started),
                                                 "total_ms": 1000 * (end - started),
                                                 "queue_ms": queued_ms + (d.queue_ms or 0.0),
                                                 "adapter_load_ms": load_ms}
                                if c.kind != "text":
                                    ok, why = check_output(c, "".join(parts), d.finish_reason)
                                    chunk.structured_output_valid, chunk.structured_output_error = ok, why
                                    STRUCTURED.labels(c.kind, str(ok).lower()).inc()
                                LATENCY.labels(label, req.frontend).observe(end - started)
                                TOKENS.labels(label, "prompt", req.frontend).inc(d.prompt_tokens)
                                TOKENS.labels(label, "completion", req.frontend).inc(d.completion_tokens)
                                outcome = "ok" if d.finish_reason != "abort" else "aborted"
                            yield chunk
                    finally:
                        watchdog.cancel()
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the client went away; the engine request was aborted
            raise
        except EngineDead as e:  # in flight when the engine died: the process exits soon
            outcome = "engine_dead"
            raise _engine_dead(str(e)) from None
        except TunewireError as e:
            outcome = {"INVALID_ARGUMENT": "invalid", "NOT_FOUND": "not_found",
                       "FAILED_PRECONDITION": "failed_precondition", "RESOURCE_EXHAUSTED": "rejected",
                       "DEADLINE_EXCEEDED": "deadline"}.get(e.code, "error")
            raise
        finally:
            REQUESTS.labels(label, outcome, req.frontend).inc()


def _check_engine(engine) -> None:
    """ENGINE_DEAD once the engine died, ENGINE_NOT_READY while it is still starting."""
    if why := engine.death():
        raise _engine_dead(why)
    if not engine.ready:
        raise TunewireError(R.ENGINE_NOT_READY, "the engine is still starting")


def _engine_dead(why: str) -> TunewireError:
    return TunewireError(R.ENGINE_DEAD, f"the vLLM engine died ({why}); this replica is "
                         "restarting: retry on another one")


class _Watchdog:
    """Aborts the engine request when the deadline passes (queued or running alike)."""

    def __init__(self, engine, rid: str, deadline: float | None):
        self.fired, self._task = False, None
        if deadline is not None:
            self._task = asyncio.create_task(self._run(engine, rid, deadline))

    async def _run(self, engine, rid, deadline):
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        self.fired = True
        while True:  # again until cancelled: the first abort may precede the engine's add_request
            await engine.abort(rid)
            await asyncio.sleep(0.05)

    def cancel(self):
        if self._task is not None:
            self._task.cancel()


@contextlib.asynccontextmanager
async def _no_adapter():
    yield None, 0.0


def _merge(prev: Chunk, new: Chunk) -> Chunk:
    new.warnings = prev.warnings or new.warnings
    return new
