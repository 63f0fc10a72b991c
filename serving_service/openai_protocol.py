"""OpenAI's API ⇄ tunewire's generation: the JSON bodies of `/v1/chat/completions` and
`/v1/completions` checked and turned into `GenerationRequest`s (one per choice), `Chunk`s turned
into OpenAI's response and stream objects, a `TunewireError` into OpenAI's error JSON. Pure
translation (no HTTP server, no engine): serving_service/openai_http.py serves it.

    call = parse_chat(body, base_names={"tiny-llama"}, request_id="abc")
    chunks = [await generator.complete(r) for r in call.requests]
    return completion_body(call, chunks)

Fields are refused, never ignored: a field tunewire does not implement is accepted only with its
neutral value (`presence_penalty: 0`, `logprobs: false`, `tools: []`, null for anything) and
otherwise answered 400 FIELD_UNSUPPORTED naming it; an unknown field is refused the same way. The
defaults are OpenAI's (temperature 1), not gRPC's (0 = greedy). docs/serving.md "OpenAI-compatible
HTTP API" lists what is supported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace

from serving_service.adapter_checks import parse_ref
from serving_service.generation import MAX_BATCH, Chunk, GenerationRequest
from tunewire import reasons as R
from tunewire.chat import ROLES
from tunewire.errors import TunewireError, invalid
from tunewire.reasons import HTTP_STATUS

MAX_N = 16  # choices per prompt; each is its own engine request (they batch like separate calls)

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
           "seed", "response_format", "user",
           "top_k", "min_tokens",  # vLLM's server accepts these too
           "time_limit_ms"}        # tunewire: as gRPC's time_limit_ms
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt"}
# Implemented only as "off": these values (and null) are accepted, any other is refused.
_NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False, 0),
            "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
            "parallel_tool_calls": (True, False), "functions": ([],), "function_call": ("none",),
            "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
            "repetition_penalty": (1,), "echo": (False,), "suffix": ("",), "best_of": (1,)}
_CHAT_NEUTRAL = set(_NEUTRAL) - {"echo", "suffix", "best_of"}
_COMPLETION_NEUTRAL = {"presence_penalty", "frequency_penalty", "logprobs", "logit_bias",
                       "repetition_penalty", "echo", "suffix", "best_of"}
_MESSAGE_NEUTRAL = {"tool_calls": ([],), "function_call": (None,), "refusal": (None,),
                    "audio": (None,)}
# gRPC field names in Generator's checks → the HTTP request's (error `param`)
_PARAMS = {"sampling.max_tokens": "max_tokens", "sampling.temperature": "temperature",
           "sampling.top_p": "top_p", "sampling.top_k": "top_k", "sampling.stop": "stop",
           "sampling.min_tokens": "min_tokens", "adapter": "model"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable_error", 504: "timeout_error"}


@dataclass(frozen=True)
class Call:
    """One HTTP generation request, parsed."""
    chat: bool                                   # /v1/chat/completions, else /v1/completions
    model: str                                   # as the client named it
    requests: tuple[GenerationRequest, ...]      # prompt-major: choice index = prompt * n + i
    n: int                                       # choices per prompt
    stream: bool
    include_usage: bool                          # stream_options.include_usage
    constrained: bool                            # json_object / json_schema: choices report validity
    created: int                                 # unix seconds, the same on every chunk


def unsupported(field: str, why: str = "is not supported by tunewire") -> TunewireError:
    return TunewireError(R.FIELD_UNSUPPORTED, f"{field}: {why}", field_violations={field: why})


def _typed(body: dict, name: str, types, default=None, what: str = ""):
    v = body.get(name)
    if v is None:
        return default
    # bool is an int in Python: a number field must not take true/false
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types)):
        raise invalid(name, f"must be {what or _names(types)}")
    return v


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _names(types) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "an object"}[t] for t in _tuple(types))


def _check_fields(body: dict, allowed: set[str], neutral: set[str], where: str = "") -> None:
    for k, v in body.items():
        if k in allowed or v is None:
            continue
        if k in neutral and any(v == ok and type(v) is not bool or v is ok for ok in _NEUTRAL[k]):
            continue
        if k in neutral:
            raise unsupported(where + k, f"only {' or '.join(json.dumps(x) for x in _NEUTRAL[k])} "
                              "(or null) is supported")
        raise unsupported(where + k, "is not a field tunewire implements")


def resolve_model(model, base_names: frozenset[str] | set[str]) -> str:
    """The `adapter` of a GenerationRequest for `model`: "" for the base model."""
    if not isinstance(model, str) or not model:
        raise invalid("model", "required: the base model's name, or an adapter name or name@vN")
    if model in base_names:
        return ""
    try:
        parse_ref(model, "model")
    except TunewireError:
        raise TunewireError(R.MODEL_NOT_FOUND, f"the model {model!r} does not exist: it is neither "
                            f"the base model ({', '.join(sorted(base_names))}) nor an adapter "
                            "name or name@vN", metadata={"model": model}) from None
    return model


def _response_format(body: dict) -> dict:
    """GenerationRequest fields for `response_format`."""
    rf = _typed(body, "response_format", dict, {})
    kind = rf.get("type", "text")
    if kind == "text" or not rf:
        return {}
    if kind == "json_object":
        return {"response_format": "json_object"}
    if kind != "json_schema":
        raise unsupported("response_format.type", f"{kind!r}: text, json_object or json_schema")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
        raise invalid("response_format.json_schema.schema", "required: a JSON schema object",
                      R.JSON_SCHEMA_INVALID)
    strict = spec.get("strict") or False
    if not isinstance(strict, bool):
        raise invalid("response_format.json_schema.strict", "must be a boolean")
    return {"response_format": "json_schema", "json_schema": json.dumps(spec["schema"]), "strict": strict}


def _sampling(body: dict, chat: bool) -> dict:
    """GenerationRequest fields for the sampling settings, with OpenAI's defaults."""
    max_tokens = _typed(body, "max_tokens", int, 0)
    if chat and body.get("max_completion_tokens") is not None:
        mct = _typed(body, "max_completion_tokens", int)
        if max_tokens and mct != max_tokens:
            raise invalid("max_completion_tokens", "differs from max_tokens: set one of them")
        max_tokens = mct
    if max_tokens < 0:
        raise invalid("max_tokens", "must be >= 1")
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(_typed(body, "stop", list, []))
    if not all(isinstance(s, str) for s in stop):
        raise invalid("stop", "must be a string or a list of strings")
    seed = _typed(body, "seed", int)
    limit = _typed(body, "time_limit_ms", int, 0)
    return dict(max_tokens=max_tokens or 0, temperature=float(_typed(body, "temperature", (int, float), 1.0)),
                top_p=float(_typed(body, "top_p", (int, float), 1.0)), top_k=_typed(body, "top_k", int, 0),
                seed=seed, stop=stop, min_tokens=_typed(body, "min_tokens", int, 0), time_limit_ms=limit)


def _content(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(f"messages[{i}].content", "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise unsupported(f"messages[{i}].content[{j}].type", f"{kind!r}: only text parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)  # as vLLM's server joins text parts


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    msgs = _typed(body, "messages", list, [])
    if not msgs:
        raise invalid("messages", "required: a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "must be an object")
        if m.get("role") not in ROLES:
            raise invalid(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        for k, v in m.items():
            if k in ("role", "content") or v is None or v in _MESSAGE_NEUTRAL.get(k, ()):
                continue
            raise unsupported(f"messages[{i}].{k}")
        out.append((m["role"], _content(i, m.get("content"))))
    return tuple(out)


def _call(body: dict, *, chat: bool, prompts: list, base_names, request_id: str) -> Call:
    adapter = resolve_model(body.get("model"), base_names)
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"must be in [1, {MAX_N}]")
    if len(prompts) * n > MAX_BATCH:
        raise invalid("n", f"prompts x n must be at most {MAX_BATCH}")
    stream = _typed(body, "stream", bool, False)
    opts = _typed(body, "stream_options", dict, {})
    if opts and not stream:
        raise invalid("stream_options", "only with stream: true")
    if set(opts) - {"include_usage"}:
        raise unsupported("stream_options." + sorted(set(opts) - {"include_usage"})[0])
    fmt, sampling = _response_format(body), _sampling(body, chat)
    base = GenerationRequest(adapter=adapter, frontend="http", **fmt, **sampling)
    reqs = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            k = p * n + i
            reqs.append(replace(base, **prompt, request_id=request_id if len(prompts) * n == 1 else
                                f"{request_id}-{k}",
                                seed=None if base.seed is None else base.seed + i))
    return Call(chat=chat, model=body["model"], requests=tuple(reqs), n=n, stream=stream,
                include_usage=bool(opts.get("include_usage")), constrained=bool(fmt),
                created=int(time.time()))


def parse_chat(body: dict, *, base_names, request_id: str) -> Call:
    """A /v1/chat/completions body; messages are rendered by the Generator with the chat
    template training uses (tunewire/chat.py)."""
    _check_fields(body, CHAT_FIELDS, _CHAT_NEUTRAL)
    return _call(body, chat=True, prompts=[{"messages": _messages(body)}], base_names=base_names,
                 request_id=request_id)


def parse_completion(body: dict, *, base_names, request_id: str) -> Call:
    """A /v1/completions body: `prompt` is a string or a list of strings (not token ids)."""
    _check_fields(body, COMPLETION_FIELDS, _COMPLETION_NEUTRAL)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise invalid("prompt", "required: a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise unsupported("prompt", "token-id prompts are not supported: send text")
    return _call(body, chat=False, prompts=[{"prompt": p} for p in prompts], base_names=base_names,
                 request_id=request_id)


# -- responses ---------------------------------------------------------------------------------
def _model_out(call: Call, c: Chunk) -> str:
    return f"{c.adapter}@{c.adapter_version}" if c.adapter else call.model


def _extension(c: Chunk) -> dict:
    return {"adapter": c.adapter, "adapter_version": c.adapter_version, "request_id": c.request_id,
            "warnings": list(c.warnings), "timings": c.timings}


def _choice_extension(call: Call, c: Chunk) -> dict:
    if not call.constrained:
        return {}
    return {"tunewire": {"structured_output_valid": c.structured_output_valid,
                         "structured_output_error": c.structured_output_error}}


def _id(call: Call, rid: str) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + rid


def usage(call: Call, finals: list[Chunk]) -> dict:
    """OpenAI counts each prompt once however many choices it has."""
    prompt = sum(c.prompt_tokens for k, c in enumerate(finals) if k % call.n == 0)
    completion = sum(c.completion_tokens for c in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(call: Call, finals: list[Chunk], request_id: str) -> dict:
    """The whole response, from each choice's complete Chunk (Generator.complete)."""
    choices = []
    for k, c in enumerate(finals):
        choice = {"index": k, "logprobs": None, "finish_reason": c.finish_reason}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choices.append({**choice, **_choice_extension(call, c)})
    return {"id": _id(call, request_id), "object": "chat.completion" if call.chat else "text_completion",
            "created": call.created, "model": _model_out(call, finals[0]), "choices": choices,
            "usage": usage(call, finals), "system_fingerprint": None, "tunewire": _extension(finals[0])}


def stream_chunk(call: Call, k: int, c: Chunk, first: bool, request_id: str) -> dict:
    """One stream event for choice `k`: its text delta, and on its last chunk the finish reason
    (and validity, timings)."""
    if call.chat:
        delta = {"role": "assistant", "content": c.text} if first else ({"content": c.text} if c.text else {})
        choice = {"index": k, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason}
    else:
        choice = {"index": k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
    out = {"id": _id(call, request_id), "object": "chat.completion.chunk" if call.chat else "text_completion",
           "created": call.created, "model": _model_out(call, c), "choices": [choice]}
    if c.finish_reason is not None:
        choice.update(_choice_extension(call, c))
        out["tunewire"] = _extension(c)
    if call.include_usage:
        out["usage"] = None
    return out


def usage_chunk(call: Call, finals: list[Chunk], request_id: str) -> dict:
    """The last event with stream_options.include_usage: no choices, the usage."""
    return {"id": _id(call, request_id), "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": call.created, "model": _model_out(call, finals[0]), "choices": [],
            "usage": usage(call, finals)}


def error_body(e: TunewireError) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error JSON, headers) for a domain error: the status is the reason's
    gRPC code's (reasons.HTTP_STATUS); `code` is tunewire's reason; 429 carries Retry-After."""
    status = 413 if e.reason == R.MESSAGE_TOO_LARGE else HTTP_STATUS.get(e.code, 500)
    param = next(iter(e.field_violations), None)
    message = e.message
    if param in _PARAMS and message.startswith(param + ":"):  # name the field as the client sent it
        message = _PARAMS[param] + message[len(param):]
    headers = {"retry-after": str(max(1, math.ceil(e.retry_after_s)))} if e.retry_after_s is not None else {}
    return status, {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                              "param": _PARAMS.get(param, param), "code": str(e.reason)}}, headers
