"""Service settings: one frozen dataclass per service (trainer_service/config.py,
serving_service/config.py) is the one home of every setting. Its fields are the keys of the TOML
file (`--config FILE`) and, through `settings`, the `tunewire serve` flags (tunewire/cli/serve.py).

    cfg = load_config(TrainerConfig, "configs/trainer.example.toml", {"port": 0})

A setting's help text is the comment beside its field (and any comment lines right under it).
"""

from __future__ import annotations

import inspect
import re
import tomllib
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

# what a setting can be, how to say it, and the check of a TOML or flag value
_TYPES = {bool: ("true or false", lambda v: isinstance(v, bool)),
          int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str)),
          tuple: ("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))}


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type       # bool, int, float, str or tuple (of str: a TOML array, a comma-separated flag)
    default: object
    help: str


def settings(cls) -> list[Setting]:
    """The settings of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    out = []
    for f in fields(cls):
        kind = typing.get_origin(hints[f.name]) or hints[f.name]
        if kind not in _TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting is a bool, int, float, str or tuple")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Setting(f.name, kind, default, notes.get(f.name, "")))
    return out


def _field_comments(cls) -> dict[str, str]:
    """`name: type = value  # comment` -> {name: comment}, with the comment lines indented under
    that comment (a comment line at the fields' own indent starts a new section instead)."""
    names = {f.name for f in fields(cls)}
    notes: dict[str, str] = {}
    last, indent = None, 0
    # base classes too (ServingConfig extends the engine's EngineConfig)
    source = "\n".join(inspect.getsource(c) for c in reversed(cls.__mro__) if "__dataclass_fields__" in vars(c))
    for line in source.splitlines():
        spaces = len(line) - len(line.lstrip())
        field = re.match(r"\s*(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if field and field.group(1) in names:
            last, indent = field.group(1), spaces
            notes[last] = (field.group(2) or "").strip()
        elif last and spaces > indent and (more := re.match(r"\s*#\s*(.*)$", line)):
            notes[last] += " " + more.group(1).strip()
        else:
            last = None
    return notes


def _check_type(s: Setting, value, where: str) -> None:
    want, ok = _TYPES[s.kind]
    if not ok(value):
        raise ValueError(f"{where}{s.name} must be {want}, not {value!r}")


def load_config(cls, path: str | None = None, overrides: dict | None = None):
    """`cls` from a TOML file (keys = field names), then the non-None `overrides` on top.
    Unknown keys and values of the wrong type raise ValueError (so does the class's own check)."""
    values = tomllib.loads(Path(path).read_text()) if path else {}
    known = {s.name: s for s in settings(cls)}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source, where in ((values, f"{path}: "), (given, "")):
        unknown = set(source) - set(known)
        if unknown:
            raise ValueError(f"{where}unknown settings {sorted(unknown)} for {cls.__name__}")
        for k, v in source.items():
            _check_type(known[k], v, where)
    return cls(**(values | given))
