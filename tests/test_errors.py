"""Error reasons have one home (tunewire/reasons.py), the docs' table is that home printed, and
List RPCs share one pagination rule (tunewire/paging.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tunewire import paging
from tunewire import reasons as R
from tunewire.errors import TunewireError, invalid

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("tunewire", "trainer_service", "serving_service")
                 for p in (ROOT / d).rglob("*.py") if "_pb2" not in p.name)
ERROR_CALLS = {"TunewireError", "invalid", "_error", "_Failure"}  # the ways a reason is raised


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ERROR_CALLS:
                yield name, node


def test_every_reason_the_code_names_is_defined_and_none_is_a_bare_string():
    named, literal = set(), []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # R.<NAME> anywhere: raised, compared, mapped
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "R":
                named.add((node.attr, f"{path.relative_to(ROOT)}:{node.lineno}"))
        for name, call in _calls(tree):
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.isupper() \
                        and "_" in arg.value:
                    literal.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}({arg.value!r})")
    undefined = sorted(f"{where}: R.{attr}" for attr, where in named
                       if attr not in R.ALL and attr not in ("Reason",))
    assert not undefined, undefined
    assert not literal, literal
    assert len({a for a, _ in named}) > 60  # the scan sees the raise sites


def test_a_bare_string_is_refused_and_the_code_follows_the_reason():
    with pytest.raises(TypeError):
        TunewireError("QUEUE_FULL", "a string is not a catalogued reason")
    e = TunewireError(R.QUEUE_FULL, "full", retry_after_s=2)
    assert (e.code, e.reason, e.retry_after_s) == ("RESOURCE_EXHAUSTED", "QUEUE_FULL", 2)
    assert invalid("x", "bad").code == "INVALID_ARGUMENT"
    assert TunewireError(R.TRAINING_DIVERGED, "nan").code == "INTERNAL"  # job-only: never a status
    assert TunewireError(R.DATASET_INVALID, "line 3").job_error() == {
        "reason": "DATASET_INVALID", "message": "line 3", "user_error": True, "retryable": False}


def test_docs_error_table_is_the_catalogue():
    doc = (ROOT / "docs" / "errors.md").read_text()
    assert R.table() in doc, "regenerate: python -m tunewire.reasons"
    for name, reason in R.ALL.items():  # and each row says what the code says
        assert f"| `{name}` | {reason.code or 'job error only'} |" in doc


def test_readme_error_summary_is_the_catalogue_by_code():
    summary = R.by_code()
    assert summary in (ROOT / "README.md").read_text(), "paste: python -m tunewire.reasons --by-code"
    for name, reason in R.ALL.items():  # each reason in its code's row, and only there
        rows = [row for row in summary.splitlines() if f"`{name}`" in row]
        assert len(rows) == 1 and rows[0].startswith(f"| {reason.code or 'job error only'} |"), name


@pytest.mark.parametrize("size", [-1, paging.MAX_PAGE_SIZE + 1])
def test_page_size_out_of_range_is_invalid(size):
    with pytest.raises(TunewireError) as e:
        paging.page([1, 2, 3], size, "", "xs")
    assert e.value.field_violations.keys() == {"page_size"}


def test_pages_walk_the_list_once_and_tokens_are_checked():
    items, seen, token = list(range(7)), [], ""
    while True:
        page, token = paging.page(items, 3, token, "xs")
        seen += page
        if not token:
            break
    assert seen == items
    assert paging.page(items, 0, "", "xs")[0] == items  # 0 = the default size (>= 7)
    first_token = paging.page(items, 3, "", "xs")[1]
    for bad in ("3", "%%%", first_token + "x", paging.page(items, 3, "", "ys")[1]):
        with pytest.raises(TunewireError) as e:
            paging.page(items, 3, bad, "xs")
        assert e.value.reason == "PAGE_TOKEN_INVALID"
