"""Satisfiability of a JSON schema: can any finite JSON value ever validate against it?

    v = analyse(schema)          # schema: a parsed dict (the client's, meta-schema checked)
    if not v.satisfiable:
        refuse(v.why)            # e.g. "unsatisfiable: the $refs form a cycle with no base case: ..."
    v.witness                    # a value built for the schema (best effort: check it to rely on it)

structured.py calls it where a schema is compiled (the verdict is cached with the compile), so a
request whose answer could never validate is refused before generation instead of answering OK
with `structured_output_valid=false`.

How: a least fixpoint. Every conjunction of subschemas the schema can demand of one value (the
root, a property, an array position, an anyOf branch with its siblings; `allOf` and `$ref` are
flattened into the conjunction) gets the set of JSON types it has a finite instance of, starting
empty; a type is added once the conjunction's own keywords allow it and the children it needs
(required properties, minItems positions) have some type. What never gets a type has no finite
instance: `$ref` cycles with no base case, and local contradictions (minLength > maxLength, no
integer between the bounds, `enum: []`, `false`, `not: {}`, types with nothing in common, a
required property that additionalProperties: false forbids, const outside its enum, ...).

Only proofs refuse. Every approximation errs towards "satisfiable": keywords the analysis does not
model (pattern, format, if/then/else, uniqueItems, dependentSchemas, unevaluated*, a `not` other
than `{}` or a bare type, oneOf taken as anyOf, remote `$ref`s) are taken as allowing anything, and
a schema too big to finish within MAX_KEYS conjunctions or BUDGET_S is accepted. enum/const are
exact: their values are checked with jsonschema (the validator check_output uses). Per-keyword
rules (bounds, lengths, types, array positions) are in schema_keywords.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import regex as pyregex
from jsonschema.validators import validator_for

from serving_service.schema_keywords import (TYPES, UNKNOWN as _UNKNOWN, false_why as _false_why,
                                             lengths as _lengths, numbers as _numbers, pointer,
                                             position as _position, prefix as _prefix,
                                             type_of as _type_of, types as _types)

MAX_KEYS = 2000        # conjunctions analysed before giving up (accepting): bounds anyOf blow-up
BUDGET_S = 0.5         # wall time before giving up (accepting); runs in the compile pool thread
_LEGACY = {"Draft3Validator", "Draft4Validator", "Draft6Validator", "Draft7Validator"}

Part = tuple[tuple, frozenset]     # (path in the root, keywords of that node already expanded)
Key = frozenset                    # a conjunction of parts


@dataclass(frozen=True)
class Verdict:
    satisfiable: bool              # False only when proven unsatisfiable
    why: str = ""                  # when unsatisfiable: what makes it so, with JSON pointers
    witness: Any = None            # a candidate instance (valid when has_witness; check it)
    has_witness: bool = False
    decided: bool = True           # False: gave up (too big, too slow) and accepted


def analyse(schema: Any) -> Verdict:
    return _Analysis(schema).run()


class _GiveUp(Exception):
    pass


class _Analysis:
    def __init__(self, root: Any):
        self.root = root
        cls = validator_for(root) if isinstance(root, dict) else None
        self.legacy = cls is not None and cls.__name__ in _LEGACY      # $ref ignores its siblings
        self.draft4 = cls is not None and cls.__name__ in ("Draft3Validator", "Draft4Validator")
        self.validator = cls(root) if cls is not None else None
        self.anchors: dict[str, tuple] = {}
        self.nested_id = False     # a subschema with its own $id: "#..." is relative to it
        self._find_anchors(root, ())
        self.state: dict[Key, dict[str, Any]] = {}
        self.order: list[Key] = []
        self.whys: dict[Key, tuple[str, Key | None]] = {}
        self.names: dict[Key, str] = {}
        self.deadline = time.monotonic() + BUDGET_S

    def run(self) -> Verdict:
        if self.root is True or self.root == {}:
            return Verdict(True, witness={}, has_witness=True)
        try:
            top = self.key([((), frozenset())], "#")
            changed = True
            while changed:
                changed = False
                for k in list(self.order):
                    if time.monotonic() > self.deadline or len(self.order) > MAX_KEYS:
                        raise _GiveUp
                    types, why, child = self.evaluate(k)
                    self.whys[k] = (why, child)
                    have = self.state[k]
                    for t, w in types.items():
                        if t not in have:
                            have[t], changed = w, True
                changed = changed or len(self.order) > len(self.whys)
        except (_GiveUp, RecursionError):
            return Verdict(True, decided=False)
        found = self.state[top]
        if not found:
            return Verdict(False, why=self.explain(top))
        w = next((w for w in found.values() if w is not _UNKNOWN), _UNKNOWN)
        return Verdict(True, witness=None if w is _UNKNOWN else w, has_witness=w is not _UNKNOWN)

    # ---- schema access ----------------------------------------------------------------------
    def _find_anchors(self, node: Any, path: tuple, data: bool = False) -> None:
        """$anchors (outside instance data: enum, const, ...) and whether any nested $id exists
        (anywhere: a false alarm only makes the analysis more lenient)."""
        if isinstance(node, dict):
            if isinstance(node.get("$anchor"), str) and not data:
                self.anchors.setdefault(node["$anchor"], path)
            if path and any(isinstance(node.get(k), str) for k in ("$id", "id")):
                self.nested_id = True
            for k, v in node.items():
                self._find_anchors(v, path + (k,), data or k in ("enum", "const", "default", "examples"))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self._find_anchors(v, path + (i,), data)

    def at(self, path: tuple) -> Any:
        node = self.root
        for seg in path:
            node = node[seg]
        return node

    def resolve(self, ref: Any) -> tuple | None:
        """The path a local $ref points at; None for what this does not follow (remote, $id)."""
        if not isinstance(ref, str) or not ref.startswith("#") or self.nested_id:
            return None
        frag = unquote(ref[1:])
        if frag and not frag.startswith("/"):
            return self.anchors.get(frag)
        node, path = self.root, ()
        for raw in frag.split("/")[1:] if frag else ():
            seg: Any = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
                seg = int(seg)
            elif not (isinstance(node, dict) and seg in node):
                return None
            node, path = node[seg], path + (seg,)
        return path

    def valid(self, value: Any, path: tuple) -> bool | None:
        if self.nested_id:         # a subschema validated alone could lose its base URI
            return None
        try:
            return self.validator.evolve(schema=self.at(path)).is_valid(value)
        except RecursionError:
            raise _GiveUp from None
        except Exception:      # noqa: BLE001 - anything jsonschema cannot decide: unknown
            return None

    # ---- conjunctions -----------------------------------------------------------------------
    def key(self, parts: list[Part], name: str) -> Key:
        """The flattened conjunction of `parts` (allOf members and $ref targets added), registered."""
        out: dict[tuple, frozenset] = {}
        todo = list(reversed(parts))   # in order: the first part names the conjunction
        while todo:
            path, drop = todo.pop()
            if path in out:          # a node already in: repeating it adds nothing we model
                continue
            node = self.at(path)
            if not isinstance(node, dict):
                out[path] = drop
                continue
            if "$ref" in node and "$ref" not in drop:
                target = self.resolve(node["$ref"])
                if target is not None:
                    todo.append((target, frozenset()))
                if self.legacy:      # draft 7 and older: siblings of $ref are ignored
                    continue
            if isinstance(node.get("allOf"), list) and "allOf" not in drop:
                todo += [(path + ("allOf", i), frozenset()) for i in range(len(node["allOf"]))]
            out[path] = drop | {"$ref", "allOf"}
        k = frozenset(out.items())
        if k not in self.state:
            self.state[k] = {}
            self.order.append(k)
            if parts:
                node = self.at(parts[0][0])
                ref = node.get("$ref") if isinstance(node, dict) else None
                name = pointer(parts[0][0]) + (f" ($ref {ref})" if isinstance(ref, str) else "")
            self.names[k] = name
        return k

    def members(self, k: Key) -> list[tuple[tuple, Any]]:
        out = []
        for path, drop in sorted(k, key=lambda p: (len(p[0]), [str(s) for s in p[0]])):
            node = self.at(path)
            out.append((path, node if isinstance(node, bool) else
                        {n: v for n, v in node.items() if n not in drop}))
        return out

    def witness(self, k: Key) -> tuple[bool, Any]:
        have = self.state[k]
        w = next((w for w in have.values() if w is not _UNKNOWN), _UNKNOWN)
        return bool(have), w

    def evaluate(self, k: Key) -> tuple[dict[str, Any], str, Key | None]:
        """(types with a witness each, why none, the child to blame) under the current state."""
        ms = self.members(k)
        allowed, where = set(TYPES), {}
        for path, d in ms:
            if d is False:
                return {}, _false_why(path), None
            if d is True:
                continue
            if "type" in d:
                allowed &= _types(d["type"])
                where[pointer(path)] = d["type"]
                if not allowed:
                    return {}, "unsatisfiable: types " + ", ".join(
                        f"{v} at {p}" for p, v in where.items()) + " have no type in common", None
            neg = d.get("not")
            if neg is True or neg == {}:
                return {}, f"{pointer(path)}: unsatisfiable: `not: {{}}` matches nothing", None
            if isinstance(neg, dict) and set(neg) == {"type"}:
                allowed -= _types(neg["type"])
                if not allowed:
                    return {}, f"{pointer(path)}: unsatisfiable: `not` excludes every type left", None
        for path, d in ms:           # enum / const: exact, checked with jsonschema
            if isinstance(d, dict) and ("enum" in d or "const" in d):
                return self.values(ms, path, d)
        for path, d in ms:           # anyOf / oneOf: one conjunction per branch (oneOf as anyOf)
            for kw in ("anyOf", "oneOf"):
                if isinstance(d, dict) and isinstance(d.get(kw), list):
                    return self.branches(k, path, kw, len(d[kw]))
        dicts = [(p, d) for p, d in ms if isinstance(d, dict)]
        out, whys = {}, []
        for t in TYPES:
            if t not in allowed:
                continue
            ok, w, why, child = self.typed(t, k, dicts)
            if ok:
                out[t] = w
            elif why:
                whys.append((why, child))
        why, child = whys[0] if whys else ("unsatisfiable", None)
        return out, why, child

    def values(self, ms, path, d) -> tuple[dict[str, Any], str, Key | None]:
        cands = [d["const"]] if "const" in d else d["enum"] if isinstance(d["enum"], list) else []
        if not cands:
            return {}, f"{pointer(path)}: unsatisfiable: `enum: []` allows no value", None
        out, first_fail = {}, ""
        for v in cands:
            fails = [p for p, _ in ms if self.valid(v, p) is False]
            if not fails:
                out.setdefault(_type_of(v), v)
            elif not first_fail:
                first_fail = f"{v!r} fails {pointer(fails[0])}"
        kw = "const" if "const" in d else "enum"
        return out, (f"{pointer(path)}: unsatisfiable: no value of its {kw} validates against the "
                     f"rest of the schema ({first_fail})"), None

    def branches(self, k: Key, path: tuple, kw: str, n: int) -> tuple[dict[str, Any], str, Key | None]:
        if n == 0:
            return {}, f"{pointer(path)}: unsatisfiable: `{kw}: []` allows no value", None
        rest = [(p, dr | {kw}) if p == path else (p, dr) for p, dr in k]
        out, first = {}, None
        for i in range(n):
            b = self.key(rest + [(path + (kw, i), frozenset())], pointer(path + (kw, i)))
            first = first or b
            for t, w in self.state[b].items():
                out.setdefault(t, w)
        return out, f"one of the {kw} branches at {pointer(path)}", first

    def typed(self, t: str, k: Key, dicts) -> tuple[bool, Any, str, Key | None]:
        """(possible, witness, why not, child to blame) for instances of type t."""
        if t == "null":
            return True, None, "", None
        if t == "boolean":
            return True, False, "", None
        if t in ("integer", "number"):
            return _numbers(t, dicts, self.draft4)
        if t == "string":
            lo, hi, why = _lengths(dicts, "minLength", "maxLength")
            return (True, "a" * lo, "", None) if not why else (False, None, why, None)
        if t == "array":
            return self.array(dicts)
        return self.object(dicts)

    def array(self, dicts) -> tuple[bool, Any, str, Key | None]:
        lo, hi, why = _lengths(dicts, "minItems", "maxItems")
        if why:
            return False, None, why, None
        longest = max((len(_prefix(d)[0]) for _, d in dicts), default=0)
        items = []
        for i in range(min(lo, longest + 1)):
            parts = [(p + pp, frozenset()) for p, d in dicts for pp in [_position(d, i)] if pp]
            c = self.key(parts, f"item {i}")
            ok, w = self.witness(c)
            if not ok:
                return False, None, f"array: minItems {lo} needs item {i}", c
            items.append(w)
        if lo > 10_000:              # possible, but not worth building
            return True, _UNKNOWN, "", None
        items += [items[-1]] * (lo - len(items)) if items else []
        for p, d in dicts:
            need = d.get("minContains", 1) if "contains" in d else 0
            if not isinstance(need, int) or need < 1:
                continue
            if hi is not None and need > hi:
                return False, None, f"{pointer(p)}: unsatisfiable: minContains {need} > maxItems {hi}", None
            if isinstance(d.get("maxContains"), int) and d["maxContains"] < need:
                return False, None, f"{pointer(p)}: unsatisfiable: minContains > maxContains", None
            # The matching item also meets the item schema of its position: some position must do.
            at, first = None, None
            for i in range(min(longest + 1, hi if hi is not None else longest + 1)):
                parts = [(q + pp, frozenset()) for q, e in dicts for pp in [_position(e, i)] if pp]
                c = self.key([(p + ("contains",), frozenset())] + parts, pointer(p + ("contains",)))
                first = first or c
                ok, w = self.witness(c)
                if ok:
                    at = i
                    break
            if at is None:
                return False, None, f"{pointer(p)}: `contains` can match no item the array allows", first
            items = items[:at] + [w] * need + items[at + need:]
        return True, (_UNKNOWN if _UNKNOWN in items else items), "", None

    def object(self, dicts) -> tuple[bool, Any, str, Key | None]:
        lo, hi, why = _lengths(dicts, "minProperties", "maxProperties")
        if why:
            return False, None, why, None
        required: list[str] = []
        for _, d in dicts:
            required += [r for r in d.get("required", ()) if isinstance(r, str) and r not in required]
        for name in required:        # dependentRequired / draft-7 dependencies: required too
            for _, d in dicts:
                for dep in (d.get("dependentRequired"), d.get("dependencies")):
                    more = dep.get(name) if isinstance(dep, dict) else None
                    if isinstance(more, list):
                        required += [r for r in more if isinstance(r, str) and r not in required]
        if hi is not None and len(required) > hi:
            return False, None, f"unsatisfiable: {len(required)} required properties > maxProperties {hi}", None
        value: dict[str, Any] = {}
        for name in required:
            ok, w, why, child = self.property(name, dicts)
            if not ok:
                return False, None, why, child
            value[name] = w
        if lo > len(value):          # more properties needed: declared ones, then fresh names
            closed = [d for _, d in dicts if d.get("additionalProperties") is False
                      and not d.get("patternProperties")]
            names = [n for _, d in dicts for n in d.get("properties", {}) if n not in value]
            if not closed:
                names += [f"p{i}" for i in range(lo)]
            for name in dict.fromkeys(names):
                if len(value) >= lo:
                    break
                ok, w, _, _ = self.property(name, dicts)
                if ok:
                    value[name] = w
            if closed and len(value) < lo:
                return False, None, (f"unsatisfiable: minProperties {lo} but only {len(value)} "
                                     "properties are allowed"), None
        return True, (_UNKNOWN if _UNKNOWN in value.values() else value), "", None

    def property(self, name: str, dicts) -> tuple[bool, Any, str, Key | None]:
        parts = []
        for p, d in dicts:
            names = d.get("propertyNames")
            if names is not None and self.valid(name, p + ("propertyNames",)) is False:
                return False, None, f"{pointer(p)}: required property {name!r} fails propertyNames", None
            props = d.get("properties") if isinstance(d.get("properties"), dict) else {}
            matched = name in props
            if matched:
                parts.append((p + ("properties", name), frozenset()))
            for pat in (d.get("patternProperties") or {}):
                try:
                    hit = pyregex.search(pat, name, timeout=0.05)
                except Exception:          # noqa: BLE001 - a pattern we cannot run: ignore it
                    hit = None
                if hit:
                    matched = True
                    parts.append((p + ("patternProperties", pat), frozenset()))
            if not matched and "additionalProperties" in d:
                parts.append((p + ("additionalProperties",), frozenset()))
        c = self.key(parts, f"property {name!r}")
        ok, w = self.witness(c)
        return ok, w, f"property {name!r}", c

    def explain(self, k: Key) -> str:
        steps: list[str] = []
        seen: dict[Key, int] = {}
        while k is not None:
            if k in seen:
                loop = steps[seen[k]:]
                return ("unsatisfiable: the $refs form a cycle with no base case: "
                        + " -> ".join(loop) + f" -> back to {self.names[k]}")
            seen[k] = len(steps)
            why, child = self.whys.get(k, ("unsatisfiable", None))
            steps.append(f"{self.names[k]} needs {why}" if child is not None else why)
            k = child
        return steps[-1] + ("" if len(steps) == 1 else " (via " + " -> ".join(steps[:-1]) + ")")
