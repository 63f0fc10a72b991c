"""Scoring of JSON outputs against reference objects (used by the demo's before/after table).

    from tunewire import evals
    evals.score_json(['{"name":"Ana","age":30,"city":"Lima"}', 'Ana is 30'],
                     [{"name": "Ana", "age": 30, "city": "Lima"}] * 2, schema)
    # -> {"valid_json_rate": 0.5, "schema_valid_rate": 0.5, "field_accuracy": 0.5,
    #     "exact_match_rate": 0.5}

An output counts as JSON only if the whole of it, less surrounding whitespace, is one JSON object
under strict rules: no trailing prose, no NaN/Infinity, no repeated keys. Values compare strictly
too: 34 matches 34, not 34.0, "34" or true.
"""

from __future__ import annotations

import json


class _NotStrictJSON(ValueError):
    pass


def _reject_constant(name: str):
    raise _NotStrictJSON(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads would keep the last of repeated keys; a reader downstream might keep the first.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _NotStrictJSON("repeated key")
    return dict(pairs)


def parse_object(text: str) -> dict | None:
    """The JSON object `text` holds (surrounding whitespace aside), or None."""
    try:
        value = json.loads(text.strip(), parse_constant=_reject_constant,
                           object_pairs_hook=_no_duplicates)
    except ValueError:  # JSONDecodeError and _NotStrictJSON
        return None
    return value if isinstance(value, dict) else None


def _same(a: object, b: object) -> bool:
    # Canonical JSON text tells 1 from 1.0 and from true, which == does not.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def score_json(outputs: list[str], references: list[dict],
               schema: dict | None = None) -> dict[str, float]:
    """Rates over the outputs, each in [0, 1]:

    valid_json_rate    output is a JSON object
    schema_valid_rate  ... that `schema` accepts (the valid rate when no schema is given)
    field_accuracy     reference fields whose value the output has exactly, over all reference
                       fields (an invalid output scores none of its reference's fields)
    exact_match_rate   output object equals its reference, no field more or less
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    validator = None
    if schema is not None:
        import jsonschema

        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validator = cls(schema)
    valid = schema_valid = exact = fields_right = fields_total = 0
    for out, ref in zip(outputs, references):
        fields_total += len(ref)
        obj = parse_object(out)
        if obj is None:
            continue
        valid += 1
        schema_valid += validator is None or validator.is_valid(obj)
        fields_right += sum(k in obj and _same(obj[k], v) for k, v in ref.items())
        exact += _same(obj, ref)
    n = len(outputs)
    return {
        "valid_json_rate": valid / n if n else 0.0,
        "schema_valid_rate": schema_valid / n if n else 0.0,
        "field_accuracy": fields_right / fields_total if fields_total else 0.0,
        "exact_match_rate": exact / n if n else 0.0,
    }
