"""Every `google.rpc.ErrorInfo` reason tunewire returns, defined once, with its gRPC code.

    from tunewire import reasons as R
    raise TunewireError(R.ADAPTER_NOT_FOUND, "no adapter 'x' is loaded or in the store")

The catalogue is the data file beside this module, reasons.toml: one line a reason with its code,
its meaning and, for a training job's error, whether the input is at fault (`user_error`) and
whether a retry may succeed (`retryable`); a reason without a code only ever appears in a job's
error. Raise sites name a reason from here (`TunewireError` refuses anything else), so clients,
docs and code agree on what a reason means and which status carries it. docs/errors.md is the
catalogue printed (`python -m tunewire.reasons`), and the README's error summary is the same
reasons grouped by code (`--by-code`); a test keeps both equal to this.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED",
         "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNAUTHENTICATED", "INTERNAL")
DOMAIN = "tunewire"  # ErrorInfo.domain of every reason
# The HTTP status each code becomes on serving's OpenAI-compatible API: google.rpc's own mapping
# (google/rpc/code.proto), which is also what OpenAI clients expect (400, 401, 404, 429, 503).
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400,
               "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504,
               "UNAVAILABLE": 503, "UNAUTHENTICATED": 401, "INTERNAL": 500}


class Reason(str):
    """An UPPER_SNAKE reason: a str (it compares, logs and serialises as its name) that also
    knows its gRPC code, what it means, and how a job's error flags it."""

    code: str | None
    doc: str
    user_error: bool
    retryable: bool

    def __new__(cls, name: str, code: str | None, doc: str, *, user_error: bool = False,
                retryable: bool = False) -> Reason:
        if code is not None and code not in CODES:
            raise ValueError(f"{name}: unknown gRPC code {code}")
        self = super().__new__(cls, name)
        self.code, self.doc, self.user_error, self.retryable = code, doc, user_error, retryable
        return self


_CATALOGUE = Path(__file__).with_name("reasons.toml")
ALL: dict[str, Reason] = {name: Reason(name, f.get("code"), f["doc"], user_error=f.get("user_error", False),
                                       retryable=f.get("retryable", False))
                          for name, f in tomllib.loads(_CATALOGUE.read_text()).items()}
globals().update(ALL)  # R.QUEUE_FULL, ...; tests/test_errors.py checks every R.<NAME> in the code


def __getattr__(name: str) -> Reason:
    raise AttributeError(f"no reason {name} in {_CATALOGUE.name}: add it there first")


def table() -> str:
    """The Markdown table of docs/errors.md."""
    rows = ["| reason | gRPC code | meaning |", "|---|---|---|"]
    for r in ALL.values():
        flags = "".join([" (user error)" if r.user_error else "", " (retryable)" if r.retryable else ""])
        rows.append(f"| `{r}` | {r.code or 'job error only'} | {r.doc}{flags} |")
    return "\n".join(rows)


def by_code() -> str:
    """The README's summary: the reasons each status code carries."""
    rows = ["| status code | HTTP | reasons |", "|---|---|---|"]
    for code in (*CODES, None):
        names = [f"`{r}`" for r in ALL.values() if r.code == code]
        if names:
            rows.append(f"| {code or 'job error only'} | {HTTP_STATUS.get(code, '')} | {', '.join(names)} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m tunewire.reasons [--by-code]
    import sys

    print(by_code() if "--by-code" in sys.argv else table())
