"""Structured output: prepares the output constraint of one generation request, checks the answer.

    so = StructuredOutputs(engine.tokenizer)                      # once per server
    c = await so.prepare("json_schema", schema=text, strict=False)  # raises TunewireError (INVALID_ARGUMENT)
    ... StructuredOutputsParams(json=c.engine_schema) ...          # regex=c.regex, choice=list(c.choices)
    ok, why = check_output(c, answer_text, finish_reason)

`prepare` validates the client's constraint and compiles it with llguidance as vLLM's guidance
backend will (same tokenizer, `disable_any_whitespace=True`), so that what the engine cannot use is
refused with INVALID_ARGUMENT up front: in the engine an errored matcher only allows EOS, an empty
answer with no reason. Keywords llguidance cannot enforce (uniqueItems, not, if/then, ...) are refused
in strict mode; otherwise the engine gets a lenient copy of the schema, the response a warning, and
`check_output` still validates the full schema. A schema no value can satisfy (a `$ref` cycle with
no base case, minLength > maxLength, `enum: []`, ...: schema_sat.py) is refused as
SCHEMA_UNSATISFIABLE, strict or not, naming why; so is one llguidance finds unsatisfiable.
Results are cached (LRU): a repeat costs a hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jsonschema
import regex as pyregex
from jsonschema.validators import validator_for
from prometheus_client import Counter, Histogram

from serving_service import schema_sat
from tunewire import reasons as R
from tunewire.errors import TunewireError

COMPILE_SECONDS = Histogram("tunewire_serving_schema_compile_seconds",
                            "Structured-output grammar compile time.", ["cache"],
                            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
STRUCTURED = Counter("tunewire_serving_structured_output_total",
                     "Structured responses by format and whether they parsed and validated.",
                     ["format", "valid"])

KINDS = ("text", "json_object", "json_schema", "regex", "choice")
FIELDS = {"json_schema": "response_format.json_schema.schema", "regex": "response_format.regex.pattern",
          "choice": "response_format.choice.choices", "json_object": "response_format"}
# vLLM refuses schemas nested deeper than this (sampling_params.MAX_STRUCTURED_OUTPUT_JSON_NESTING).
MAX_NESTING = 64
# A timed-out compile cannot be killed (llguidance runs in native code): it finishes in the
# background. Two workers bound the CPU that slow schemas can take; while both are busy, new misses
# wait in the queue and that wait counts against their timeout, which sheds load under a flood of
# slow schemas. Cache hits never touch the pool.
COMPILE_WORKERS = 2
# The pattern is the client's and `re` backtracks, holding the GIL (`(a+)+b` on 30 a's: over a
# minute): check_output uses the `regex` package (re-compatible, a transformers dependency) with a timeout.
MATCH_TIMEOUT_S = 0.5
_UNIMPLEMENTED = "Unimplemented keys: "
_ONE_OF_FALLBACK = "oneOf not fully supported"
_REASONS = {"regex": R.REGEX_INVALID, "choice": R.CHOICE_INVALID}
_STRICT_ONLY = (_UNIMPLEMENTED, "oneOf constraints are not supported")   # errors lenient mode lifts
# llguidance's own proofs that nothing matches (kept when schema_sat accepted the schema).
_LL_UNSATISFIABLE = ("Unsatisfiable schema", "Failed to generate regex for integer range")


@dataclass(frozen=True)
class Constraint:
    kind: str                              # "text" | "json_object" | "json_schema" | "regex" | "choice"
    schema: dict | None = None             # the client's schema, parsed (server-side validation uses it)
    engine_schema: dict | None = None      # the schema vLLM gets (lenient copy in non-strict mode)
    regex: str = ""
    choices: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    compile_ms: float = 0.0                # wall time of prepare for this request (0-ish when cached)
    cached: bool = False                   # compile result came from the cache


@dataclass
class _Failure(Exception):         # raised by the compile job, cached, re-raised as INVALID_ARGUMENT
    reason: R.Reason
    problem: str


def _error(kind: str, reason: R.Reason, problem: str) -> TunewireError:
    f = FIELDS[kind]
    return TunewireError(reason, f"{f}: {problem}", field_violations={f: problem})


def _short(err: str) -> str:
    # llguidance errors can span lines (regex carets, panic backtraces): keep the telling line.
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()] or ["unknown error"]
    return next((ln for ln in lines if ln.startswith("error:")), lines[0])[:300]


def _too_deep(value: Any) -> bool:
    level = [value]
    for _ in range(MAX_NESTING):
        level = [c for n in level if isinstance(n, (dict, list))
                 for c in (n.values() if isinstance(n, dict) else n) if isinstance(c, (dict, list))]
        if not level:
            return False
    return True


class StructuredOutputs:
    def __init__(self, tokenizer_factory: Callable[[], Any], *, max_schema_bytes: int = 65536,
                 compile_timeout_s: float = 5.0, cache_size: int = 256, max_choices: int = 256,
                 max_pattern_chars: int = 4096):
        self._tokenizer_factory = tokenizer_factory
        self.max_schema_bytes, self.compile_timeout_s = max_schema_bytes, compile_timeout_s
        self.cache_size, self.max_choices, self.max_pattern_chars = cache_size, max_choices, max_pattern_chars
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="schema-compile")
        self._cache: OrderedDict[str, dict | _Failure] = OrderedDict()
        self._ll_tok = None
        self._tok_lock = threading.Lock()

    async def prepare(self, kind: str, *, schema: str = "", strict: bool = False, regex: str = "",
                      choices: Sequence[str] = ()) -> Constraint:
        if kind == "text":
            return Constraint("text")
        if kind not in KINDS:
            raise TunewireError(R.INVALID_FIELD, f"response_format: unknown format {kind!r}",
                                field_violations={"response_format": f"must be one of {list(KINDS)}"})
        started = time.perf_counter()
        payload = self._check_input(kind, schema, regex, choices)
        strict = strict and kind == "json_schema"
        key = hashlib.sha256(json.dumps(
            [kind, payload, strict], ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            COMPILE_SECONDS.labels("hit").observe(time.perf_counter() - started)
            return self._result(kind, hit, started, cached=True)
        loop = asyncio.get_running_loop()
        try:
            if self._ll_tok is None:       # built once (~1 s for a real vocab), outside the timeout
                await loop.run_in_executor(None, self._ll_tokenizer)
            parts: dict | _Failure
            try:
                async with asyncio.timeout(self.compile_timeout_s):  # not wait_for: see admission.py
                    parts = await loop.run_in_executor(self._pool, self._compile, kind, payload, strict)
            except _Failure as f:
                parts = f
            except TimeoutError:   # a still-queued job is dropped, a running one finishes
                # not cached: the schema may compile in time when the machine is less busy
                raise _error(kind, R.SCHEMA_COMPILE_TIMEOUT,
                             f"compiling took longer than {self.compile_timeout_s:g} s") from None
            self._cache[key] = parts
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return self._result(kind, parts, started, cached=False)
        finally:
            COMPILE_SECONDS.labels("miss").observe(time.perf_counter() - started)

    def _check_input(self, kind: str, schema: str, regex: str, choices: Sequence[str]) -> Any:
        """Cheap checks on the event loop; returns the canonical payload for the cache key."""
        if kind == "json_object":
            return None
        if kind == "regex":
            problem = ("required" if not regex else
                       f"longer than {self.max_pattern_chars} characters" if len(regex) > self.max_pattern_chars
                       else "must not contain NUL" if "\x00" in regex else "")
            if not problem:
                try:
                    pyregex.compile(regex)   # check_output matches with it
                except (pyregex.error, RecursionError, OverflowError) as e:
                    problem = f"invalid regex: {e}"
            if problem:
                raise _error(kind, R.REGEX_INVALID, problem)
            return regex
        if kind == "choice":
            choices = list(choices)
            problem = ("at least one choice is required" if not choices else
                       f"at most {self.max_choices} choices" if len(choices) > self.max_choices else
                       "choices must be non-empty strings" if not all(isinstance(c, str) and c for c in choices)
                       else "choices must be distinct" if len(set(choices)) != len(choices) else
                       f"longer than {self.max_schema_bytes} bytes in all"
                       if sum(len(c.encode()) for c in choices) > self.max_schema_bytes else "")
            if problem:
                raise _error(kind, R.CHOICE_INVALID, problem)
            return choices
        size = len(schema.encode("utf-8"))
        if size > self.max_schema_bytes:
            raise _error(kind, R.SCHEMA_TOO_LARGE, f"{size} bytes, the limit is {self.max_schema_bytes}")
        if not schema.strip():
            raise _error(kind, R.JSON_SCHEMA_INVALID, "required")
        try:
            parsed = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise _error(kind, R.JSON_SCHEMA_INVALID, f"not valid JSON: {e}") from None
        if parsed is True:
            parsed = {}                    # `true` matches anything, like {}
        if parsed is False:
            raise _error(kind, R.JSON_SCHEMA_INVALID, "the schema `false` matches nothing")
        if not isinstance(parsed, dict):
            raise _error(kind, R.JSON_SCHEMA_INVALID, "must be a JSON object")
        if _too_deep(parsed):
            raise _error(kind, R.SCHEMA_TOO_LARGE, f"nested more than {MAX_NESTING} levels deep")
        # Keys keep their order: llguidance emits properties in schema order, so two schemas that
        # differ only in key order are different constraints.
        return parsed

    def _result(self, kind: str, parts: dict | _Failure, started: float, *, cached: bool) -> Constraint:
        if isinstance(parts, _Failure):
            raise _error(kind, parts.reason, parts.problem)
        # Cached dicts are shared between requests: callers (and vLLM, which copies) must not mutate.
        return Constraint(kind, **parts, compile_ms=1000 * (time.perf_counter() - started), cached=cached)

    # llguidance comes with vLLM (the serving extra): imported lazily so that check_output and the
    # error paths work without it.
    def _ll_tokenizer(self):
        with self._tok_lock:
            if self._ll_tok is None:
                import llguidance.hf

                self._ll_tok = llguidance.hf.from_tokenizer(self._tokenizer_factory())
            return self._ll_tok

    def _match(self, grammar: str) -> tuple[str, list[str]]:
        """(error, warnings) of a real matcher: its constructor is where vLLM's engine compiles (it
        builds the lexer against the vocabulary); `validate_grammar` misses some failures."""
        import llguidance

        m = llguidance.LLMatcher(self._ll_tok, grammar, log_level=0)
        return m.get_error(), list(m.get_grammar_warnings())

    def _compile(self, kind: str, payload: Any, strict: bool) -> dict:
        """In a pool thread. Returns the Constraint fields, or raises _Failure."""
        import llguidance

        if kind != "json_schema":          # as vLLM: grammar_from("regex" / "choice", ...)
            err, _ = self._match(_json_grammar({"type": "object"}) if kind == "json_object"
                                 else llguidance.grammar_from(kind, payload))
            if err:
                raise _Failure(_REASONS.get(kind, R.SCHEMA_COMPILE_FAILED), _short(err))
            if kind == "regex":
                return {"regex": payload}
            return {"choices": tuple(payload)} if kind == "choice" else {}
        try:
            validator_for(payload).check_schema(payload)   # pure Python, ~1 s for 100 kB: off the loop
        except jsonschema.SchemaError as e:
            raise _Failure(R.JSON_SCHEMA_INVALID,
                           f"not a valid JSON schema: {e.message} (at {e.json_path})") from None
        # Before llguidance: an answer that can never validate is refused, strict or not, with why.
        verdict = schema_sat.analyse(payload)
        if not verdict.satisfiable:
            raise _Failure(R.SCHEMA_UNSATISFIABLE, verdict.why[:500])
        err, warns = self._match(_json_grammar(payload))
        if not err and not warns:
            return {"schema": payload, "engine_schema": payload}
        if err and not err.startswith(_STRICT_ONLY):
            raise _Failure(R.SCHEMA_UNSATISFIABLE if _short(err).startswith(_LL_UNSATISFIABLE)
                           else R.SCHEMA_COMPILE_FAILED, _short(err))
        # Either llguidance refused a keyword, or the client's own x-guidance made it lenient. The
        # lenient compile lists every unenforceable keyword (the strict error names only the first).
        guidance = payload.get("x-guidance")
        guidance = guidance if isinstance(guidance, dict) else {}
        lenient = {**payload, "x-guidance": {**guidance, "lenient": True}}
        lerr, lwarns = self._match(_json_grammar(lenient))
        if lerr:
            raise _Failure(R.SCHEMA_COMPILE_FAILED, _short(lerr))
        keywords: set[str] = set()
        for w in lwarns:
            if w.startswith(_UNIMPLEMENTED):   # 'Unimplemented keys: ["if", "then"]'
                rest = w[len(_UNIMPLEMENTED):]
                keywords.update(json.loads(rest) if rest.startswith("[") else [rest])
            elif w.startswith(_ONE_OF_FALLBACK):
                keywords.add("oneOf")      # approximated with anyOf
            else:                          # e.g. "Unknown format: foo-bar": lenient would drop it
                raise _Failure(R.SCHEMA_COMPILE_FAILED, _short(w))
        if not keywords:
            raise _Failure(R.SCHEMA_COMPILE_FAILED, _short(err or "; ".join(warns)))
        names = json.dumps(sorted(keywords))
        if strict:
            raise _Failure(R.SCHEMA_UNSUPPORTED, f"schema keywords not supported in strict mode: {names}")
        return {"schema": payload, "engine_schema": lenient,
                "warnings": (f"schema keywords not enforced while decoding: {names}",)}


def _json_grammar(schema: dict) -> str:
    import llguidance

    try:   # as vLLM's guidance backend with disable_any_whitespace=True
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise _Failure(R.SCHEMA_COMPILE_FAILED, _short(str(e))) from None


def check_output(c: Constraint, text: str, finish_reason: str | None) -> tuple[bool, str]:
    """(valid, why not). For text: (True, "")."""
    if c.kind == "text":
        return True, ""
    ok, why = _check(c, text)
    if not ok and finish_reason == "length":
        why = "truncated at max_tokens"
    return ok, why


def _check(c: Constraint, text: str) -> tuple[bool, str]:
    if c.kind == "regex":
        try:
            matched = pyregex.fullmatch(c.regex, text, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            return False, "could not check the pattern in time"
        return (True, "") if matched else (False, "does not match the pattern")
    if c.kind == "choice":
        return (True, "") if text in c.choices else (False, "not one of the choices")
    if not text.strip():               # e.g. the engine ended the answer before any output
        return False, "the answer is empty"
    try:
        value = json.loads(text, parse_constant=_no_constant)   # no NaN / Infinity
    except (ValueError, RecursionError) as e:
        return False, f"not valid JSON: {e}"
    if c.kind == "json_object" or c.schema is None:
        return (True, "") if isinstance(value, dict) else (False, "not a JSON object")
    # Full validation, including the keywords llguidance does not enforce while decoding.
    error = jsonschema.exceptions.best_match(validator_for(c.schema)(c.schema).iter_errors(value))
    return (True, "") if error is None else (False, f"does not match the schema: {error.message}")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")
