"""Generation on the engine: request checks, adapter routing, constrained output, accounting.

`Generator.stream` is the one path for both `Generate` and `StreamGenerate`: it validates the
request (prompt or chat messages, sampling ranges, the JSON schema against its meta-schema),
resolves the adapter through the registry (unknown → NOT_FOUND, never an engine request), runs
the engine, and on the last chunk reports timings and whether a JSON answer parsed and validated.
Per-adapter metrics are kept here because vLLM's own metrics have no adapter label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jsonschema
from prometheus_client import Counter, Histogram

from serving_service.registry import AdapterRegistry
from tunewire.errors import InvalidArgument, Unavailable, invalid

REQUESTS = Counter("tunewire_serving_requests_total", "Generation requests by adapter and outcome.",
                   ["adapter", "outcome"])
TTFT = Histogram("tunewire_serving_ttft_seconds", "Time to first token.", ["adapter"],
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
LATENCY = Histogram("tunewire_serving_e2e_latency_seconds", "End-to-end generation latency.", ["adapter"],
                    buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
TOKENS = Counter("tunewire_serving_tokens_total", "Prompt and completion tokens.", ["adapter", "kind"])
STRUCTURED = Counter("tunewire_serving_structured_output_total",
                     "JSON responses by whether they parsed and validated.", ["valid"])
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class GenerationRequest:
    adapter: str = ""                             # "" = base model
    prompt: str = ""                              # raw prompt, or:
    messages: tuple[tuple[str, str], ...] = ()    # (role, content) rendered by the chat template
    max_tokens: int = 0                           # 0 = the server default
    temperature: float = 0.0                      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                                # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_format: str = "text"                 # text | json_object | json_schema
    json_schema: str = ""                         # schema text for json_schema
    request_id: str = ""


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


def parse_schema(text: str) -> dict | bool:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument("JSON_SCHEMA_INVALID", f"json_schema is not valid JSON: {e}",
                              field_violations={"response_format.json_schema.schema": "not valid JSON"}) from e
    if not isinstance(schema, (dict, bool)):
        raise invalid("response_format.json_schema.schema", "must be a JSON object", "JSON_SCHEMA_INVALID")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidArgument("JSON_SCHEMA_INVALID", f"json_schema is not a valid JSON schema: {e.message}",
                              field_violations={"response_format.json_schema.schema": e.message}) from e
    return schema


def check_structured(text: str, schema, finish_reason: str | None) -> tuple[bool, str]:
    """(valid, why not) for a JSON answer, checked server-side."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        why = "truncated at max_tokens" if finish_reason == "length" else f"not valid JSON: {e}"
        return False, why
    if schema is None:
        return (True, "") if isinstance(value, dict) else (False, "not a JSON object")
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return False, f"does not match the schema: {e.message}"
    return True, ""


class Generator:
    def __init__(self, engine, registry: AdapterRegistry, *, default_max_tokens: int, max_model_len: int):
        self.engine, self.registry = engine, registry
        self.default_max_tokens, self.max_model_len = default_max_tokens, max_model_len

    def _params(self, req: GenerationRequest):
        from serving_service.engine import GenParams  # engine imports vllm; keep it lazy

        if bool(req.prompt) == bool(req.messages):
            raise invalid("prompt", "exactly one of prompt and messages is required")
        for i, (role, _) in enumerate(req.messages):
            if role not in ROLES:
                raise invalid(f"messages[{i}].role", f"must be one of {sorted(ROLES)}")
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
        schema = parse_schema(req.json_schema) if req.response_format == "json_schema" else None
        return GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                         top_k=req.top_k, seed=req.seed, stop=tuple(req.stop),
                         json_schema=schema if isinstance(schema, dict) else None,
                         json_object=req.response_format == "json_object"), schema

    def tokenize(self, adapter: str, text: str) -> list[tuple[int, str, int, int]]:
        """(id, token text, start, end) for each token of `text`, offsets into `text`."""
        if not self.engine.ready:
            raise Unavailable("ENGINE_NOT_READY", "the engine is still starting")
        if adapter:
            self.registry.resolve(adapter)  # NOT_FOUND like Generate; adapters share the tokenizer
        enc = self.engine.tokenizer()(text, return_offsets_mapping=True)
        return [(i, text[a:b], a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        if not self.engine.ready:
            raise Unavailable("ENGINE_NOT_READY", "the engine is still starting")
        params, schema = self._params(req)
        adapter = self.registry.resolve(req.adapter) if req.adapter else None
        label = adapter.name if adapter else "base"
        prompt = req.prompt or self.engine.render_chat([{"role": r, "content": c} for r, c in req.messages])
        n_prompt = len(self.engine.tokenizer().encode(prompt))
        if n_prompt + params.max_tokens > self.max_model_len:
            raise InvalidArgument("PROMPT_TOO_LONG",
                                  f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                  f"the context length {self.max_model_len}",
                                  field_violations={"prompt": "too long for max_model_len"})
        rid = req.request_id or uuid.uuid4().hex
        structured = req.response_format != "text"
        started = time.perf_counter()
        first = None
        text_parts: list[str] = []
        outcome = "error"
        lora = (adapter.engine_name, adapter.lora_id, str(adapter.path)) if adapter else None
        try:
            with (self.registry.use(adapter) if adapter else contextlib.nullcontext()):
                async for d in self.engine.generate(rid, prompt, params, lora):
                    if first is None and (d.text or d.completion_tokens):
                        first = time.perf_counter()
                        TTFT.labels(label).observe(first - started)
                    chunk = Chunk(text=d.text, prompt_tokens=d.prompt_tokens,
                                  completion_tokens=d.completion_tokens, request_id=rid,
                                  adapter=adapter.name if adapter else "",
                                  adapter_version=adapter.version if adapter else "")
                    if structured:
                        text_parts.append(d.text)
                    if d.finish_reason is not None:
                        end = time.perf_counter()
                        chunk.finish_reason = d.finish_reason
                        chunk.timings = {"ttft_ms": 1000 * ((first or end) - started),
                                         "total_ms": 1000 * (end - started),
                                         "queue_ms": d.queue_ms or 0.0}
                        if structured:
                            ok, why = check_structured("".join(text_parts), schema, d.finish_reason)
                            chunk.structured_output_valid, chunk.structured_output_error = ok, why
                            STRUCTURED.labels(str(ok).lower()).inc()
                        LATENCY.labels(label).observe(end - started)
                        TOKENS.labels(label, "prompt").inc(d.prompt_tokens)
                        TOKENS.labels(label, "completion").inc(d.completion_tokens)
                        outcome = "ok" if d.finish_reason != "abort" else "aborted"
                    yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the client went away; the engine request was aborted
            raise
        finally:
            REQUESTS.labels(label, outcome).inc()
