"""Per-keyword rules of the JSON-schema satisfiability analysis (schema_sat.py): type sets,
length and numeric bounds merged over a conjunction of subschemas, array positions. Pure
functions over parsed schema dicts; `dicts` is a list of (path, schema dict) that all apply to one
value.

    lengths(dicts, "minLength", "maxLength")   # (lo, hi, why unsatisfiable or "")
    numbers("integer", dicts, draft4=False)     # (possible, witness, why, None)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
UNKNOWN = object()     # witness of a type the analysis allows but could not build a value for


def pointer(path: tuple) -> str:
    return "#" + "".join("/" + str(s).replace("~", "~0").replace("/", "~1") for s in path)


def false_why(path: tuple) -> str:
    if path and path[-1] == "additionalProperties":
        return f"{pointer(path)}: unsatisfiable: `additionalProperties: false` forbids it"
    return f"{pointer(path)}: unsatisfiable: the schema `false` matches nothing"


def types(t: Any) -> set[str]:
    names = t if isinstance(t, list) else [t]
    out = set()
    for n in names:
        out |= {"integer", "number"} if n == "number" else {n} if n in TYPES else set()
    return out


def type_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(v), "object")


def lengths(dicts, lo_kw: str, hi_kw: str) -> tuple[int, int | None, str]:
    lo, hi, lo_at, hi_at = 0, None, "", ""
    for p, d in dicts:
        a, b = d.get(lo_kw), d.get(hi_kw)
        if isinstance(a, (int, float)) and not isinstance(a, bool) and math.ceil(a) > lo:
            lo, lo_at = math.ceil(a), pointer(p)
        if isinstance(b, (int, float)) and not isinstance(b, bool) and (hi is None or math.floor(b) < hi):
            hi, hi_at = math.floor(b), pointer(p)
    if hi is not None and lo > hi:
        where = lo_at if lo_at == hi_at else f"{lo_at} and {hi_at}"
        return lo, hi, f"{where}: unsatisfiable: {lo_kw} {lo} > {hi_kw} {hi}"
    return lo, hi, ""


def prefix(d: dict) -> tuple[list, str, str]:
    """(positional schemas, their keyword, the keyword for the rest)."""
    if isinstance(d.get("prefixItems"), list):
        return d["prefixItems"], "prefixItems", "items"
    if isinstance(d.get("items"), list):
        return d["items"], "items", "additionalItems"
    return [], "", "items"


def position(d: dict, i: int) -> tuple | None:
    items, kw, rest = prefix(d)
    if i < len(items):
        return (kw, i)
    return (rest,) if rest in d else None


def _num(v: Any) -> Fraction | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return Fraction(v)


def numbers(t: str, dicts, draft4: bool) -> tuple[bool, Any, str, None]:
    lo = hi = None                  # (value, exclusive, where)
    steps = []
    for p, d in dicts:
        for kw, is_lo in (("minimum", True), ("maximum", False), ("exclusiveMinimum", True),
                          ("exclusiveMaximum", False)):
            v = _num(d.get(kw))
            if v is None:
                continue
            if kw.startswith("exclusive"):
                if draft4:          # draft 4: a boolean that modifies minimum / maximum
                    continue
                excl = True
            else:
                excl = draft4 and d.get("exclusiveM" + kw[1:]) is True
            b = (v, excl, f"{kw} {d[kw]} at {pointer(p)}")
            if is_lo and (lo is None or v > lo[0] or (v == lo[0] and excl)):
                lo = b
            if not is_lo and (hi is None or v < hi[0] or (v == hi[0] and excl)):
                hi = b
        m = _num(d.get("multipleOf"))
        if m is not None and m > 0:
            steps.append(m)
    if lo and hi and (lo[0] > hi[0] or (lo[0] == hi[0] and (lo[1] or hi[1]))):
        return False, None, f"unsatisfiable: no number is within {lo[2]} and {hi[2]}", None
    integral = all(s.denominator == 1 for s in steps)
    step = math.lcm(*(int(s) for s in steps)) if steps and integral else 1
    w = _multiple_in(lo, hi, step) if integral else None
    if w is not None:
        return True, w, "", None
    if integral and (t == "integer" or steps):   # multiples of an integer are integers
        what = f"multiple of {step}" if step > 1 else "integer"
        bounds = " and ".join(b[2] for b in (lo, hi) if b)
        return False, None, f"unsatisfiable: no {what} is within {bounds}", None
    if t == "number" and not steps:  # any real in a non-empty interval
        if lo and hi:
            v = lo[0] if lo[0] == hi[0] else (lo[0] + hi[0]) / 2
        else:
            v = (lo[0] + 1) if lo else (hi[0] - 1)
        return True, float(v), "", None
    return True, UNKNOWN, "", None  # non-integer multipleOf: not modelled, allowed


def _multiple_in(lo, hi, step: int) -> int | None:
    if lo is None and hi is None:
        return 0
    if lo is not None:
        k = math.ceil(lo[0] / step)
        if lo[1] and k * step == lo[0]:
            k += 1
        v = k * step
        ok = hi is None or v < hi[0] or (v == hi[0] and not hi[1])
        return v if ok else None
    k = math.floor(hi[0] / step)
    if hi[1] and k * step == hi[0]:
        k -= 1
    return k * step
