"""Loading the services' settings: a frozen dataclass from a TOML file, then CLI overrides."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path


def load_config(cls, path: str | None = None, overrides: dict | None = None):
    """`cls` from a TOML file (keys = field names), then non-None overrides on top."""
    values = tomllib.loads(Path(path).read_text()) if path else {}
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in known})
    return cls(**values)
