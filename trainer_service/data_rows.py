"""The rows of a data file, checked: their format, every problem by line and field, the examples.

Every method reads its files through here (LoRA and full fine-tuning through
trainer_service.loop, feature extraction through recipe_classifier), and so do the create-time
check, the pre-flight report and the JSON evals, so a file that passes one passes them all.
A row has one of four formats (prompt_completion and messages rows may share a file: both train
only the completion; any other mix is an error):

    prompt_completion  {"prompt": "Extract the person as JSON: ...", "completion": "{...}"}
    messages           {"messages": [{"role": "user", "content": "..."}, {"role": ...}, ...]}
    text               {"text": "..."}                    causal LM on the whole text
    classification     {"text": "...", "label": "spam"}   for the feature-extraction method

in any file trainer_service.data_readers reads (JSONL, JSON, CSV, Parquet). `scan_file` lists
every problem without raising (the pre-flight report, trainer_service.preflight, is built on
it); `load_examples` raises the first one and returns the rows as `datasets` loads them.

    scan = scan_file("train.csv")               # .format, .examples, .lines, .issues, .unit
    examples = load_examples("train.csv")       # [{"prompt": ..., "completion": ...}, ...]
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from trainer_service.data_readers import DatasetIssue, Raw, read_file
from tunewire import reasons as R
from tunewire.chat import ROLES
from tunewire.errors import TunewireError

FORMATS = ("prompt_completion", "messages", "text", "classification")
# The fields that mark a row's format; text/label rows are classification once any row has a label.
_FAMILIES = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",),
             "text": ("text", "label")}
# Prompt/completion and chat rows may share a file: both train only the completion, row by row
# (and older data mixes them). Any other mix is an error.
_KINDS = {"prompt_completion": "completion", "messages": "completion", "text": "text"}
_FIELDS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",),
           "text": ("text",), "classification": ("text", "label")}  # what an example keeps


@dataclass(frozen=True)
class FileScan:
    """A file read and checked row by row: the valid examples and every problem found."""
    path: Path
    unit: str                   # what DatasetIssue.line counts: "line" or "row"
    format: str | None          # one of FORMATS; None when no row has a recognisable format
    examples: list[dict]        # the valid rows, reduced to their format's fields
    lines: list[int]            # the position of each example
    issues: list[DatasetIssue]  # in file order
    columns: tuple[str, ...] = ()  # CSV header
    source: str = "train"       # "train" or "validation": how messages name the file


def _json_type(v: object) -> str:
    names = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _families(row: dict) -> list[str]:
    # None is an absent field: Arrow (datasets, Parquet) gives every row every column. An empty
    # string counts only when nothing else does: a CSV of mixed rows leaves the other cells empty.
    for present in (lambda v: v is not None and v != "", lambda v: v is not None):
        if found := [f for f, names in _FAMILIES.items() if any(present(row.get(n)) for n in names)]:
            return found
    return []


def _detect(raw: Raw, unit: str) -> tuple[str | None, dict[int, str], list[DatasetIssue]]:
    """The file's format (its first recognisable row's), each usable row's format, and the rows
    with no format or one that does not go with the file's."""
    family, issues = {}, []
    for line, row in raw:
        if not isinstance(row, dict):
            issues.append(DatasetIssue(line, "", f"expected an object, got {_json_type(row)}"))
        elif not (found := _families(row)):
            issues.append(DatasetIssue(line, "", "has none of the fields prompt/completion, "
                                                 "messages, text or text/label"))
        elif len(found) > 1:
            issues.append(DatasetIssue(line, found[1], f"give the fields of one format per row, "
                                                       f"not both {found[0]} and {found[1]}"))
        else:
            family[line] = found[0]
    if not family:
        return None, {}, issues
    first_line, first = next(iter(family.items()))
    fmt = first
    if first == "text" and any(row.get("label") is not None for line, row in raw
                               if family.get(line) == "text"):
        fmt = "classification"
    formats = {}
    for line, fam in family.items():
        if _KINDS[fam] == _KINDS[first]:
            formats[line] = fmt if fam == "text" else fam
        else:
            issues.append(DatasetIssue(line, "", f"is a {fam} row but the file's format is {fmt} "
                                                 f"(set by {unit} {first_line}); use one format "
                                                 f"per file"))
    return fmt, formats, sorted(issues, key=lambda i: i.line)


def _field_problems(row: dict, fmt: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def string(name: str, nonempty: bool) -> None:
        v = row.get(name)
        if v is None:
            out.append((name, f"is missing (a {fmt} row needs {' and '.join(_FIELDS[fmt])})"))
        elif not isinstance(v, str):
            out.append((name, f"must be a string, got {_json_type(v)}"))
        elif nonempty and not v:
            out.append((name, "must not be empty"))

    if fmt == "prompt_completion":
        string("prompt", nonempty=False)
        string("completion", nonempty=True)
    elif fmt in ("text", "classification"):
        string("text", nonempty=True)
        label = row.get("label")
        if fmt == "text":
            return out
        if label is None:
            out.append(("label", "is missing (a classification row needs text and label)"))
        elif isinstance(label, bool) or not isinstance(label, (str, int)):
            out.append(("label", f"must be a string or an integer, got {_json_type(label)}"))
        elif label == "":
            out.append(("label", "must not be empty"))
    else:
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return [("messages", "must be a non-empty list of {role, content}")]
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                out.append((f"messages[{i}]", "must be an object with role and content"))
                continue
            role = m.get("role")
            if not isinstance(role, str) or not role:
                out.append((f"messages[{i}].role", "must be a non-empty string"))
            elif role not in ROLES:
                out.append((f"messages[{i}].role", f"unknown role {role!r}; use one of {ROLES}"))
            if not isinstance(m.get("content"), str):
                out.append((f"messages[{i}].content", f"must be a string, got "
                                                      f"{_json_type(m.get('content'))}"))
        last, n = msgs[-1], len(msgs) - 1
        if isinstance(last, dict) and last.get("role") in ROLES:
            if last["role"] != "assistant":
                out.append((f"messages[{n}].role", f"the last message must be the assistant's "
                                                   f"(the one to learn), not {last['role']!r}"))
            elif last.get("content") == "":
                out.append((f"messages[{n}].content", "must not be empty"))
    return out


def _shape(row: dict, fmt: str) -> dict:
    """The example as its format's fields only (rows from Arrow carry every column)."""
    if fmt == "messages":
        msgs = row["messages"]
        msgs = json.loads(msgs) if isinstance(msgs, str) else msgs  # CSV cells are JSON text
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    return {k: row[k] for k in _FIELDS[fmt]}


def example_format(example: dict) -> str:
    """The format of one example as scan_file and load_examples return them."""
    if "messages" in example:
        return "messages"
    if "text" in example:
        return "classification" if "label" in example else "text"
    return "prompt_completion"


def scan_file(path: str | Path, source: str = "train") -> FileScan:
    """Reads and checks every row of a file; never raises for what the file holds. `source`
    ("train" or "validation") is the file's role, which its issues carry."""
    p = Path(path)
    raw = read_file(p)
    fmt, formats, shape_issues = _detect(raw.rows, raw.unit)
    issues = raw.issues + shape_issues
    examples, lines, first_label = [], [], None
    for line, row in raw.rows:
        if (row_fmt := formats.get(line)) is None:
            continue  # a shape problem, already reported
        problems = _field_problems(row, row_fmt)
        if row_fmt == "classification" and not problems:
            # Arrow needs one type per column, and "1" and 1 would be two classes.
            label_type = _json_type(row["label"])
            first_label = first_label or (label_type, line)
            if label_type != first_label[0]:
                problems.append(("label", f"is {label_type} but {raw.unit} {first_label[1]} has "
                                          f"{first_label[0]}; use one label type per file"))
        issues += [DatasetIssue(line, f, m) for f, m in problems]
        if not problems:
            examples.append(_shape(row, row_fmt))
            lines.append(line)
    issues = [replace(i, source=source) for i in sorted(issues, key=lambda i: i.line)]
    return FileScan(p, raw.unit, fmt, examples, lines, issues, raw.columns, source)


def load_examples(path: str | Path, *, scan: FileScan | None = None,
                  source: str = "train") -> list[dict]:
    """Reads and checks a data file; returns its rows with their format's fields only.

    Raises DATASET_NOT_FOUND, DATASET_INVALID (the first problem, by line or row, and field) or
    DATASET_EMPTY, naming the file by `source` ("training data", "validation data"). `scan`
    reuses a scan_file result of the same path (and its source).
    """
    p = Path(path)
    source = scan.source if scan else source
    what = "validation data" if source == "validation" else "training data"
    if not p.is_file():
        raise TunewireError(R.DATASET_NOT_FOUND, f"no {what} file at {path}")
    scan = scan or scan_file(p, source)
    if scan.issues:
        raise TunewireError(R.DATASET_INVALID, scan.issues[0].describe(scan.unit))
    if not scan.examples:
        raise TunewireError(R.DATASET_EMPTY, f"{what} {path} has no examples")

    import datasets  # heavy import; only the worker needs it

    kind, options = {".csv": "csv", ".parquet": "parquet"}.get(p.suffix.lower(), "json"), {}
    if kind == "csv":  # every cell as text, "" kept, exactly as the scan read it
        options = dict(features=datasets.Features({c: datasets.Value("string")
                                                   for c in scan.columns}),
                       keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    # A private cache directory: the shared HF cache would keep an Arrow copy of every job's data
    # and could serve a stale copy when a file is rewritten in place.
    with tempfile.TemporaryDirectory(prefix="tunewire-data-") as cache:
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", cache_dir=cache,
                                       **options)
        except Exception as e:  # noqa: BLE001 - e.g. an extra field whose type changes
            raise TunewireError(R.DATASET_INVALID, f"{what} could not be loaded: "
                                f"{type(e).__name__}: {e}") from None
        if ds.num_rows != len(scan.examples):  # the two readers disagree: trust neither
            raise TunewireError(R.DATASET_INVALID, f"{what}: datasets read {ds.num_rows} "
                                f"rows where the file has {len(scan.examples)}")
        # The scan knows each row's format; Arrow rows carry every column, None where absent.
        return [_shape(row, example_format(ex)) for row, ex in zip(ds, scan.examples)]
