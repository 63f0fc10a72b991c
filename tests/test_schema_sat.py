"""JSON-schema satisfiability (serving_service/schema_sat.py), against jsonschema as the reference.

Every schema the analysis accepts has a witness that jsonschema validates (the analysis's own, or
one written here where it cannot build one, e.g. for a `pattern`); every refused schema says in the
table why nothing can match, and no value of a small universe validates against it. A seeded random
sweep over the keywords the analysis models checks both directions at scale. The last test refuses a
cyclic schema through real gRPC (slow: a serving subprocess).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import grpc
import pytest
from jsonschema.validators import validator_for

from serving_service.schema_sat import analyse
from serving_service.structured import StructuredOutputs
from tunewire.errors import TunewireError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serving_schemas import SCHEMAS  # noqa: E402  (bench/ is not a package)

pytestmark = pytest.mark.timeout(60)

CYCLE = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                         "required": ["next"]}}, "$ref": "#/$defs/n"}

# (schema, why no value can match it, a fragment of the analysis's explanation)
UNSATISFIABLE = [
    (CYCLE, "every n needs a `next` that is an n: only an infinite chain would do",
     "cycle with no base case"),
    ({"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
                "b": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"},
     "a needs b, a non-empty array of a: again an infinite chain", "cycle with no base case"),
    ({"type": "string", "minLength": 5, "maxLength": 3}, "no string is both >= 5 and <= 3 long",
     "minLength 5 > maxLength 3"),
    ({"type": "number", "minimum": 5, "maximum": 3}, "no number is >= 5 and <= 3", "no number"),
    ({"type": "number", "exclusiveMinimum": 2, "maximum": 2}, "x > 2 and x <= 2", "no number"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "no integer in (1, 2)",
     "no integer"),
    ({"type": "integer", "minimum": 1.5, "maximum": 1.7}, "no integer in [1.5, 1.7]", "no integer"),
    ({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4}, "no multiple of 5 in [1, 4]",
     "no multiple of 5"),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "minimum": 1,
      "exclusiveMinimum": True, "maximum": 2, "exclusiveMaximum": True},
     "draft 4 boolean exclusive bounds: no integer in (1, 2)", "no integer"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "no length is >= 3 and <= 2",
     "minItems 3 > maxItems 2"),
    ({"type": "object", "minProperties": 3, "maxProperties": 1}, "no size is >= 3 and <= 1",
     "minProperties 3 > maxProperties 1"),
    ({"enum": []}, "an empty enum allows nothing", "`enum: []`"),
    ({"type": "object", "properties": {"a": {"not": {}}}, "required": ["a"]},
     "`not: {}` rejects every value, and a is required", "`not: {}`"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]},
     "a is required but its schema is false", "`false` matches nothing"),
    ({"type": "object", "properties": {"b": {}}, "required": ["a"], "additionalProperties": False},
     "a is required but only b may appear", "`additionalProperties: false` forbids it"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": False, "minProperties": 2},
     "only a may appear, yet two properties are needed", "minProperties 2"),
    ({"type": "object", "required": ["abc"], "propertyNames": {"maxLength": 2}},
     "abc is required but names are at most 2 long", "fails propertyNames"),
    ({"const": 1, "enum": [2, 3]}, "the const 1 is outside the enum", "no value of its const"),
    ({"type": "string", "enum": [1, 2]}, "every enum value is a number, the type is string",
     "no value of its enum"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "no value is both a string and an integer",
     "no type in common"),
    ({"allOf": [{"type": "integer", "minimum": 5}, {"maximum": 3}]}, "allOf merges to 5 <= x <= 3",
     "no number"),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"type": "integer"}]}},
      "required": ["a"]}, "a is required and its allOf contradicts itself", "no type in common"),
    ({"anyOf": [{"type": "string", "minLength": 3, "maxLength": 1}, {"type": "integer", "maximum": -1,
                                                                        "minimum": 0}]},
     "both branches contradict themselves", "anyOf"),
    ({"type": "null", "not": {"type": "null"}}, "only null is allowed, and null is excluded",
     "excludes every type"),
    ({"type": "array", "prefixItems": [{"type": "string"}, False], "minItems": 2},
     "item 1 must match false", "minItems 2 needs item 1"),
    ({"type": "array", "items": {"type": "string"}, "contains": {"type": "integer"}},
     "contains asks for an integer item in an array of strings", "contains"),
]

# (schema, witness written here, or None: the analysis's own must validate)
SATISFIABLE = [
    ({"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                      "required": ["kids"]}}, "$ref": "#/$defs/n"}, None),      # base case: no kids
    ({"$defs": {"n": {"type": ["object", "null"], "properties": {"next": {"$ref": "#/$defs/n"}},
                      "required": ["next"]}}, "$ref": "#/$defs/n"}, None),      # base case: null
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"type": "integer"}]}}}, None),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, None),   # 1.5
    ({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 7}, None),
    ({"anyOf": [{"type": "string", "minLength": 3, "maxLength": 1}, {"type": "integer", "minimum": 3}]}, None),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"s": {"type": "string"}},
      "$ref": "#/definitions/s", "type": "integer"}, None),   # draft 7: siblings of $ref are ignored
    ({"type": "object", "required": ["a", "b"], "dependentRequired": {"a": ["c"]},
      "properties": {"c": {"const": 3}}}, None),
    ({"type": "array", "contains": {"type": "integer"}, "minItems": 2}, None),
    ({"type": "string", "pattern": "^[0-9]{3}$"}, "123"),                       # pattern: not modelled
    ({"$defs": {"a": {"$id": "https://example.com/a", "$defs": {"b": {"type": "string"}},
                      "$ref": "#/$defs/b"}, "b": False}, "$ref": "#/$defs/a"}, "s"),  # $ref under $id
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]}, None),
    ({"type": "number", "multipleOf": 0.5, "minimum": 0.25, "maximum": 0.75}, 0.5),  # not modelled
]
SATISFIABLE += [(s, None) for s in SCHEMAS.values() if "currency" not in json.dumps(s)]
INVOICE = next(s for s in SCHEMAS.values() if "currency" in json.dumps(s))
MONEY = {"amount": 1, "currency": "EUR"}       # currency has a pattern: written here
PARTY = {"name": "ann"}
SATISFIABLE.append((INVOICE, {"number": "1", "issued": "2024-01-01", "seller": PARTY, "buyer": PARTY,
                              "lines": [{"description": "x", "quantity": 1, "unit_price": MONEY}],
                              "total": MONEY}))

# A small universe of values for the refused schemas: none of these may validate.
SCALARS = [None, True, False, 0, 1, -1, 2, 3, 5, 1.5, 0.5, "", "a", "ab", "abc", "abcde"]
UNIVERSE = (SCALARS + [[], [""], ["a", 1], [1], [1, 2, 3], [{}], {}, {"a": 1}, {"a": ""}, {"b": 1},
                       {"a": None, "b": 2}, {"next": None}, {"abc": 1}, {"a": 1, "b": 2, "c": 3}])


def valid(schema, value) -> bool:
    return validator_for(schema)(schema).is_valid(value)


@pytest.mark.parametrize("schema,why,fragment", UNSATISFIABLE, ids=[u[2][:30] for u in UNSATISFIABLE])
def test_unsatisfiable_schemas_are_proven(schema, why, fragment):
    v = analyse(schema)
    assert not v.satisfiable and v.decided, why
    assert fragment in v.why, v.why
    assert not [x for x in UNIVERSE if valid(schema, x)], why


@pytest.mark.parametrize("schema,witness", SATISFIABLE, ids=range(len(SATISFIABLE)))
def test_satisfiable_schemas_are_accepted_with_a_witness(schema, witness):
    v = analyse(schema)
    assert v.satisfiable, v.why
    if witness is None:
        assert v.has_witness
        witness = v.witness
    assert valid(schema, witness), witness


def test_undecidable_accepts():
    # Too many anyOf combinations to finish: accepted rather than guessed.
    wide = {"allOf": [{"anyOf": [{"type": "object", "properties": {f"k{i}_{j}": {"type": "string"}}}
                                 for j in range(80)]} for i in range(3)]}
    v = analyse(wide)
    assert v.satisfiable and not v.decided


# ---- a seeded sweep over the modelled keywords --------------------------------------------------
def _random_schema(rnd: random.Random, depth: int) -> dict | bool:
    if depth > 2 or rnd.random() < 0.15:
        return rnd.choice([True, False, {}, {"type": rnd.choice(["string", "integer", "null"])}])
    s: dict = {}
    t = rnd.choice(["string", "integer", "number", "array", "object", None, ["string", "null"]])
    if t is not None:
        s["type"] = t
    if t == "string" or rnd.random() < 0.2:
        for kw in ("minLength", "maxLength"):
            if rnd.random() < 0.5:
                s[kw] = rnd.randint(0, 4)
    if t in ("integer", "number") or rnd.random() < 0.2:
        for kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if rnd.random() < 0.35:
                s[kw] = rnd.choice([0, 1, 2, 1.5, 3])
        if rnd.random() < 0.2:
            s["multipleOf"] = rnd.choice([2, 3])
    if t == "array":
        for kw in ("minItems", "maxItems"):
            if rnd.random() < 0.5:
                s[kw] = rnd.randint(0, 3)
        if rnd.random() < 0.7:
            s["items"] = _random_schema(rnd, depth + 1)
    if t == "object":
        s["properties"] = {n: _random_schema(rnd, depth + 1) for n in "ab" if rnd.random() < 0.7}
        s["required"] = [n for n in "abc" if rnd.random() < 0.4]
        if rnd.random() < 0.3:
            s["additionalProperties"] = rnd.choice([False, {"type": "integer"}])
    if rnd.random() < 0.15:
        s["enum"] = rnd.sample([None, 0, 1, 2, "a", "", [], {}], rnd.randint(0, 3))
    if rnd.random() < 0.15:
        s["allOf"] = [_random_schema(rnd, depth + 1) for _ in range(2)]
    if rnd.random() < 0.15:
        s["anyOf"] = [_random_schema(rnd, depth + 1) for _ in range(2)]
    return s


def test_random_schemas_agree_with_jsonschema():
    rnd = random.Random(16)
    accepted = refused = 0
    for _ in range(400):
        schema = _random_schema(rnd, 0)
        if not isinstance(schema, dict):
            continue
        v = analyse(schema)
        if v.satisfiable:
            accepted += 1     # only modelled keywords: the analysis always builds a valid witness
            assert v.has_witness and valid(schema, v.witness), (schema, v.witness)
        else:
            refused += 1
            found = [x for x in UNIVERSE if valid(schema, x)]
            assert not found, (schema, v.why, found)
    assert accepted > 100 and refused > 50, (accepted, refused)


# ---- where schemas are compiled ----------------------------------------------------------------
@pytest.fixture(scope="module")
def so(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return StructuredOutputs(lambda: tok)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("schema,why,fragment", UNSATISFIABLE[:4] + UNSATISFIABLE[11:18],
                         ids=[u[2][:30] for u in UNSATISFIABLE[:4] + UNSATISFIABLE[11:18]])
def test_prepare_refuses_before_generation(so, schema, why, fragment, strict):
    with pytest.raises(TunewireError) as e:
        asyncio.run(so.prepare("json_schema", schema=json.dumps(schema), strict=strict))
    field = "response_format.json_schema.schema"
    assert (e.value.code, e.value.reason) == ("INVALID_ARGUMENT", "SCHEMA_UNSATISFIABLE"), why
    assert fragment in e.value.field_violations[field] and fragment in e.value.message


def test_prepare_accepts_every_bench_schema(so):
    for name, schema in SCHEMAS.items():
        for strict in (False, True):
            c = asyncio.run(so.prepare("json_schema", schema=json.dumps(schema), strict=strict))
            assert c.schema == schema, name


@pytest.fixture
def srv(tmp_path_factory, tiny_model_dir):
    from test_serving import Serving

    yield from Serving.for_module(tmp_path_factory, tiny_model_dir, "schema-sat")


@pytest.mark.slow
@pytest.mark.timeout(600)     # starting the service: ~30-90 s on 2 shared cores
def test_cyclic_schema_refused_through_grpc(srv):
    from harness import expect_error
    from test_serving import gen
    from tunewire.serving.v1 import serving_pb2 as spb

    for strict in (False, True):
        fmt = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json.dumps(CYCLE), strict=strict))
        _, fields = expect_error(lambda: gen(srv.stub, fmt=fmt), grpc.StatusCode.INVALID_ARGUMENT,
                                 "SCHEMA_UNSATISFIABLE")
        assert "cycle with no base case" in json.dumps(fields)
    tree = SATISFIABLE[0][0]     # recursive with a base case: served, and never invalid unexplained
    fmt = spb.ResponseFormat(json_schema=spb.JsonSchemaFormat(schema=json.dumps(tree), strict=True))
    r = gen(srv.stub, fmt=fmt, max_tokens=48)
    try:
        ok = valid(tree, json.loads(r.text))
    except ValueError:
        ok = False
    assert r.structured_output_valid == ok, (r.text, r.structured_output_error)
    assert ok or r.structured_output_error, r.text
    r = gen(srv.stub, fmt=fmt, max_tokens=2)      # cut: invalid, and says why
    assert not r.structured_output_valid and r.structured_output_error == "truncated at max_tokens"
