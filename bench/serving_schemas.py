"""The schemas part of bench/serving.py: structured-output compile time, cold vs cached.

`serving_service.structured.StructuredOutputs.prepare` directly (no engine): for each of five
real-world JSON schemas (small to large) the compile time with a fresh cache and from the cache;
the one-time llguidance tokenizer build is reported apart. Also the person schema that the
structured part of bench/serving.py constrains its answers with.

    .venv/bin/python bench/serving.py --parts schemas
"""

from __future__ import annotations

import json
import time

from _common import bar_png, md_table, median, write_json

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "city": {"type": "string"},
                   "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False,
}


# Real-world schemas, small -> large.
SCHEMAS = {
    "person (4 props)": PERSON_SCHEMA,
    "address (enum, pattern)": {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 80},
            "city": {"type": "string"},
            "postal_code": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{3}$"},
            "country": {"type": "string", "enum": ["PT", "ES", "FR", "DE", "IT", "GB", "US"]},
            "kind": {"enum": ["home", "work", "billing"]},
        },
        "required": ["street", "city", "country"], "additionalProperties": False,
    },
    "tool call (anyOf, arrays)": {
        "type": "object",
        "properties": {
            "tool": {"enum": ["search", "get_weather", "send_email", "create_event"]},
            "arguments": {"anyOf": [
                {"type": "object", "properties": {"query": {"type": "string"},
                                                  "top_k": {"type": "integer", "minimum": 1, "maximum": 20}},
                 "required": ["query"], "additionalProperties": False},
                {"type": "object", "properties": {"city": {"type": "string"},
                                                  "units": {"enum": ["metric", "imperial"]}},
                 "required": ["city"], "additionalProperties": False},
                {"type": "object", "properties": {"to": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 1, "maxItems": 5},
                                                  "subject": {"type": "string"}, "body": {"type": "string"}},
                 "required": ["to", "subject", "body"], "additionalProperties": False},
                {"type": "object", "properties": {"title": {"type": "string"},
                                                  "start": {"type": "string", "format": "date-time"},
                                                  "minutes": {"type": "integer", "minimum": 5}},
                 "required": ["title", "start"], "additionalProperties": False},
            ]},
        },
        "required": ["tool", "arguments"], "additionalProperties": False,
    },
    "invoice ($defs, nested)": {
        "$defs": {
            "money": {"type": "object", "properties": {
                "amount": {"type": "number", "minimum": 0},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                "required": ["amount", "currency"], "additionalProperties": False},
            "party": {"type": "object", "properties": {
                "name": {"type": "string"}, "vat_id": {"type": "string"},
                "email": {"type": "string", "format": "email"}},
                "required": ["name"], "additionalProperties": False},
            "line": {"type": "object", "properties": {
                "sku": {"type": "string"}, "description": {"type": "string"},
                "quantity": {"type": "integer", "minimum": 1}, "unit_price": {"$ref": "#/$defs/money"}},
                "required": ["description", "quantity", "unit_price"], "additionalProperties": False},
        },
        "type": "object",
        "properties": {
            "number": {"type": "string"}, "issued": {"type": "string", "format": "date"},
            "seller": {"$ref": "#/$defs/party"}, "buyer": {"$ref": "#/$defs/party"},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 1, "maxItems": 50},
            "total": {"$ref": "#/$defs/money"}, "paid": {"type": "boolean"},
            "notes": {"type": ["string", "null"]},
        },
        "required": ["number", "issued", "seller", "buyer", "lines", "total"],
        "additionalProperties": False,
    },
    "github issue (large)": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 256},
            "body": {"type": "string"},
            "state": {"enum": ["open", "closed"]},
            "state_reason": {"enum": ["completed", "not_planned", "reopened", None]},
            "labels": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "color": {"type": "string", "pattern": "^[0-9a-f]{6}$"},
                "description": {"type": ["string", "null"]}},
                "required": ["name"], "additionalProperties": False}, "maxItems": 20},
            "assignees": {"type": "array", "items": {"type": "string",
                                                     "pattern": "^[A-Za-z0-9-]{1,39}$"}, "maxItems": 10},
            "milestone": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                "title": {"type": "string"}, "due_on": {"type": "string", "format": "date-time"},
                "open_issues": {"type": "integer", "minimum": 0}}, "required": ["title"],
                "additionalProperties": False}]},
            "reactions": {"type": "object", "properties": {
                k: {"type": "integer", "minimum": 0} for k in
                ("+1", "-1", "laugh", "hooray", "confused", "heart", "rocket", "eyes")},
                "additionalProperties": False},
            "comments": {"type": "array", "maxItems": 100, "items": {"type": "object", "properties": {
                "author": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
                "body": {"type": "string"},
                "author_association": {"enum": ["OWNER", "MEMBER", "COLLABORATOR", "CONTRIBUTOR",
                                                "FIRST_TIMER", "NONE"]}},
                "required": ["author", "body"], "additionalProperties": False}},
            "locked": {"type": "boolean"},
            "number": {"type": "integer", "minimum": 1},
            "created_at": {"type": "string", "format": "date-time"},
        },
        "required": ["title", "state", "number"], "additionalProperties": False,
    },
}


async def schema_part(args) -> dict:
    from transformers import AutoTokenizer

    from serving_service.structured import StructuredOutputs

    tok = AutoTokenizer.from_pretrained(args.model)
    so = StructuredOutputs(lambda: tok, compile_timeout_s=60)
    t = time.perf_counter()
    so._ll_tokenizer()
    tok_ms = (time.perf_counter() - t) * 1000
    rows = []
    for label, schema in SCHEMAS.items():
        text = json.dumps(schema)
        cold, warm = [], []
        for _ in range(args.schema_repeats):
            fresh = StructuredOutputs(lambda: tok, compile_timeout_s=60)
            fresh._ll_tok = so._ll_tok            # the tokenizer is built once per server
            c = await fresh.prepare("json_schema", schema=text)
            assert not c.cached
            cold.append(c.compile_ms)
            for _ in range(5):
                w = await fresh.prepare("json_schema", schema=text)
                assert w.cached
                warm.append(w.compile_ms)
        rows.append({"schema": label, "bytes": len(text), "cold_ms_median": median(cold),
                     "cold_ms_max": max(cold), "cached_ms_median": median(warm),
                     "warnings": list(c.warnings) if hasattr(c, "warnings") else []})
    return {"tokenizer_build_ms": tok_ms, "repeats": args.schema_repeats, "rows": rows}


def report(args, s: dict, common: dict) -> None:
    """The table on stdout, docs/bench/serving_schemas<suffix>.json and its PNG."""
    rows = [[r["schema"], r["bytes"], f"{r['cold_ms_median']:.1f}", f"{r['cold_ms_max']:.1f}",
             f"{r['cached_ms_median']:.3f}"] for r in s["rows"]]
    print(f"\n## Schema compile (StructuredOutputs.prepare, guidance; median of {s['repeats']} "
          f"cold, 5x{s['repeats']} cached; one-time tokenizer build {s['tokenizer_build_ms']:.0f} ms)\n")
    print(md_table(["schema", "bytes", "cold ms (median)", "cold ms (max)", "cached ms"], rows))
    write_json("serving_schemas" + args.suffix, {**common, **s})
    bar_png("serving_schemas" + args.suffix, "Schema compile time: cold vs cached (ms)",
            [r["schema"] for r in s["rows"]],
            {"cold": [r["cold_ms_median"] for r in s["rows"]],
             "cached": [r["cached_ms_median"] for r in s["rows"]]}, "ms")
