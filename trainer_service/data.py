"""Training data: find a file, read and check it, tokenize with the right labels, pad batches.

A file is JSON Lines (`.jsonl`, or `.json` holding lines or one array), CSV (`.csv`, header first)
or Parquet (`.parquet`). Its rows have one of four formats (prompt_completion and messages rows
may share a file: both train only the completion; any other mix is an error):

    prompt_completion  {"prompt": "Extract the person as JSON: ...", "completion": "{...}"}
    messages           {"messages": [{"role": "user", "content": "..."}, {"role": ...}, ...]}
    text               {"text": "..."}                    causal LM on the whole text
    classification     {"text": "...", "label": "spam"}   for a feature-extraction method

(In a CSV file a `messages` cell holds the list as JSON text.) Problems name the row by position:
"line N" for JSONL and CSV (the line of the file, the CSV header being line 1), "row N" (from 1)
for Parquet and JSON arrays. `scan_file` lists every problem without raising (the pre-flight
report, trainer_service.preflight, is built on it); `load_examples` raises the first one.

Only the completion, the last assistant turn, or the whole text is trained on. The tokenization
copies what serving feeds the model for the same request, so the adapter learns on exactly the
token sequences it will see:

- prompt/completion: the prompt is `tokenizer(prompt).input_ids` (with the tokenizer's default
  special tokens, e.g. BOS), as vLLM's completions endpoint encodes a raw prompt; the completion
  is encoded without special tokens and followed by EOS, which is labelled so the model learns
  to stop.
- messages: the chat template renders the conversation to text, which is encoded without special
  tokens (the template writes its own), as vLLM's chat endpoint does. Labels start after the
  generation prompt of the last turn and end with the end-of-turn token; whatever the template
  writes after it (e.g. a newline) is never generated, so it is cut off.
- text: `tokenizer(text).input_ids` plus EOS, every token labelled.
- classification rows are not tokenized here (the feature-extraction method reads them).

    path = resolve_data_path(request.path, data_root, "training_job.training_data.path")
    examples = load_examples(path)
    rows, stats = tokenize_dataset(examples, tokenizer, max_seq_length=512)
    batch = collate(rows[:8], pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunewire import reasons as R
from tunewire.chat import ROLES, render_prompt
from tunewire.errors import TunewireError, invalid

if TYPE_CHECKING:
    import torch

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
FORMATS = ("prompt_completion", "messages", "text", "classification")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
# The fields that mark a row's format; text/label rows are classification once any row has a label.
_FAMILIES = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",),
             "text": ("text", "label")}
# Prompt/completion and chat rows may share a file: both train only the completion, row by row
# (and older data mixes them). Any other mix is an error.
_KINDS = {"prompt_completion": "completion", "messages": "completion", "text": "text"}
_FIELDS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",),
           "text": ("text",), "classification": ("text", "label")}  # what an example keeps


@dataclass(frozen=True)
class DatasetIssue:
    line: int            # line (JSONL, CSV) or row (Parquet, JSON array) from 1; 0: the whole file
    field: str           # e.g. "completion", "messages[2].role"; "" when the whole row is at fault
    message: str
    source: str = "train"  # the file: "train" or "validation"

    def describe(self, unit: str = "line") -> str:
        """As one message: "training data line 3: field completion: must not be empty"."""
        where = f"training data {unit} {self.line}" if self.line else "training data"
        return f"{where}: " + (f"field {self.field}: " if self.field else "") + self.message


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


def resolve_data_path(path: str, data_root: str | Path, field: str) -> Path:
    """The real path of a data file named in a request, confined to `data_root`.

    `path` is absolute or relative to data_root. It must resolve (symlinks included) inside the
    root, else INVALID_ARGUMENT DATASET_PATH_INVALID; it must be an existing file (else
    DATASET_NOT_FOUND) with a supported extension (else DATASET_PATH_INVALID). Returning the
    resolved path means a symlink swapped afterwards cannot redirect the read.
    """
    root = Path(data_root).resolve()
    if not path:
        raise invalid(field, "is required", R.DATASET_PATH_INVALID)
    try:
        real = (root / path).resolve()  # an absolute `path` replaces the root here
    except (OSError, ValueError, RuntimeError) as e:  # NUL byte, symlink loop
        raise invalid(field, f"{path!r} is not a usable path ({e})",
                      R.DATASET_PATH_INVALID) from None
    if not real.is_relative_to(root):
        # Do not say where it leads: that would map files outside the root.
        raise invalid(field, f"{path!r} is outside the data directory (paths are relative to it)",
                      R.DATASET_PATH_INVALID)
    if not real.exists():
        raise invalid(field, f"no file at {path!r}", R.DATASET_NOT_FOUND)
    if not real.is_file():
        raise invalid(field, f"{path!r} is not a file", R.DATASET_NOT_FOUND)
    if real.suffix.lower() not in EXTENSIONS:
        raise invalid(field, f"{path!r} is not a supported data file; use one of "
                             f"{', '.join(EXTENSIONS)}", R.DATASET_PATH_INVALID)
    return real


# ---- reading ---------------------------------------------------------------------------------
Raw = list[tuple[int, object]]  # (position, parsed row)


def _json_type(v: object) -> str:
    names = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _read_jsonl(data: bytes) -> tuple[Raw, list[DatasetIssue]]:
    rows, issues = [], []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # datasets skips blank lines too, so rows still map to lines
        try:
            rows.append((line_no, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError:
            issues.append(DatasetIssue(line_no, "", "not UTF-8 text"))
        except json.JSONDecodeError as e:
            issues.append(DatasetIssue(line_no, "", f"not valid JSON ({e.msg} at column "
                                                    f"{e.colno})"))
    return rows, issues


def _read_json_array(data: bytes) -> tuple[Raw, list[DatasetIssue]]:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return [], [DatasetIssue(0, "", f"not UTF-8 text (line {line})")]
    except json.JSONDecodeError as e:
        return [], [DatasetIssue(0, "", f"not valid JSON ({e.msg} at line {e.lineno} column "
                                        f"{e.colno})")]
    return list(enumerate(items, start=1)), []


def _read_csv(data: bytes) -> tuple[Raw, list[DatasetIssue], tuple[str, ...]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [DatasetIssue(data[:e.start].count(b"\n") + 1, "", "not UTF-8 text")], ()
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": quoted cells keep theirs
    rows, issues, header = [], [], None
    while True:
        start = reader.line_num + 1  # a record may span lines; errors name its first
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            issues.append(DatasetIssue(start, "", f"not valid CSV ({e})"))
            break  # the reader cannot resynchronise after a broken quote
        if not record:
            continue  # a blank line; pandas skips these too
        if header is None:
            header = tuple(record)
            dupes = sorted({c for c in header if header.count(c) > 1})
            if dupes:
                issues.append(DatasetIssue(start, "", f"header names column(s) {dupes} twice"))
            continue
        if len(record) != len(header):
            issues.append(DatasetIssue(start, "", f"has {len(record)} value(s) but the header "
                                                  f"names {len(header)} column(s)"))
            continue
        row = dict(zip(header, record))
        if row.get("messages"):  # a chat in one cell is JSON text
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as e:
                issues.append(DatasetIssue(start, "messages", f"not valid JSON ({e.msg} at column "
                                                              f"{e.colno})"))
                continue
        elif "messages" in row:
            row["messages"] = None  # an empty cell is a missing value, not an empty chat
        rows.append((start, row))
    return rows, issues, header or ()


def _read_parquet(path: Path) -> tuple[Raw, list[DatasetIssue]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is unusable
        return [], [DatasetIssue(0, "", f"not a readable Parquet file: {type(e).__name__}: {e}")]
    return list(enumerate(table.to_pylist(), start=1)), []


# ---- checking --------------------------------------------------------------------------------
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


def detect_format(rows: Sequence[object], *, lines: Sequence[int] | None = None,
                  unit: str = "row") -> str:
    """The one format of `rows` (see FORMATS); raises DATASET_INVALID naming the first row with
    another format or none, DATASET_EMPTY without rows. `lines` are the rows' positions."""
    raw = list(zip(lines if lines is not None else range(1, len(rows) + 1), rows))
    fmt, _, issues = _detect(raw, unit)
    if issues:
        raise TunewireError(R.DATASET_INVALID, issues[0].describe(unit))
    if fmt is None:
        raise TunewireError(R.DATASET_EMPTY, "training data has no examples")
    return fmt


def scan_file(path: str | Path) -> FileScan:
    """Reads and checks every row of a file; never raises for what the file holds."""
    p = Path(path)
    suffix = p.suffix.lower()
    unit = "row" if suffix == ".parquet" else "line"
    columns: tuple[str, ...] = ()
    if suffix not in EXTENSIONS:
        raw, issues = [], [DatasetIssue(0, "", f"{p.name} is not a supported data file; use one "
                                               f"of {', '.join(EXTENSIONS)}")]
    elif not p.is_file():
        raw, issues = [], [DatasetIssue(0, "", f"no file at {path}")]
    elif suffix == ".parquet":
        raw, issues = _read_parquet(p)
    else:
        try:
            data = p.read_bytes()
        except OSError as e:
            data, issues = None, [DatasetIssue(0, "", f"cannot read {path}: {e.strerror}")]
        if data is None:
            raw = []
        elif suffix == ".csv":
            raw, issues, columns = _read_csv(data)
        elif suffix == ".json" and data.lstrip()[:1] == b"[":
            unit = "row"
            raw, issues = _read_json_array(data)
        else:
            raw, issues = _read_jsonl(data)
    fmt, formats, shape_issues = _detect(raw, unit)
    issues = issues + shape_issues
    examples, lines, first_label = [], [], None
    for line, row in raw:
        if (row_fmt := formats.get(line)) is None:
            continue  # a shape problem, already reported
        problems = _field_problems(row, row_fmt)
        if row_fmt == "classification" and not problems:
            # Arrow needs one type per column, and "1" and 1 would be two classes.
            label_type = _json_type(row["label"])
            first_label = first_label or (label_type, line)
            if label_type != first_label[0]:
                problems.append(("label", f"is {label_type} but {unit} {first_label[1]} has "
                                          f"{first_label[0]}; use one label type per file"))
        issues += [DatasetIssue(line, f, m) for f, m in problems]
        if not problems:
            examples.append(_shape(row, row_fmt))
            lines.append(line)
    return FileScan(p, unit, fmt, examples, lines, sorted(issues, key=lambda i: i.line), columns)


def load_examples(path: str | Path, *, scan: FileScan | None = None) -> list[dict]:
    """Reads and checks a data file; returns its rows with their format's fields only.

    Raises DATASET_NOT_FOUND, DATASET_INVALID (the first problem, by line or row, and field) or
    DATASET_EMPTY. `scan` reuses a scan_file result of the same path.
    """
    p = Path(path)
    if not p.is_file():
        raise TunewireError(R.DATASET_NOT_FOUND, f"no training data file at {path}")
    scan = scan or scan_file(p)
    if scan.issues:
        raise TunewireError(R.DATASET_INVALID, scan.issues[0].describe(scan.unit))
    if not scan.examples:
        raise TunewireError(R.DATASET_EMPTY, f"training data {path} has no examples")

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
            raise TunewireError(R.DATASET_INVALID, f"training data could not be loaded: "
                                f"{type(e).__name__}: {e}") from None
        if ds.num_rows != len(scan.examples):  # the two readers disagree: trust neither
            raise TunewireError(R.DATASET_INVALID, f"training data: datasets read {ds.num_rows} "
                                f"rows where the file has {len(scan.examples)}")
        # The scan knows each row's format; Arrow rows carry every column, None where absent.
        return [_shape(row, example_format(ex)) for row, ex in zip(ds, scan.examples)]


# ---- tokenizing ------------------------------------------------------------------------------
def encode_example(example: dict, tokenizer, *,
                   eos_ids: Collection[int] | None = None) -> tuple[list[int], list[int]]:
    """Full (untruncated) input ids and labels of one checked example."""
    return _encode(example, tokenizer, end_ids(tokenizer, eos_ids))


def _encode(example: dict, tokenizer, eos_ids: Collection[int]) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if "label" in example:
        raise TunewireError(R.DATASET_INVALID, "text/label rows are classification data for a "
                            "feature-extraction method, not causal-LM training; use prompt/"
                            "completion, messages or text rows")
    if "text" in example:
        ids = tokenizer(example["text"]).input_ids
        ids = ids if ids and ids[-1] == eos else ids + [eos]  # unless the tokenizer adds it
        return ids, list(ids)
    if "messages" in example:
        msgs = example["messages"]
        prefix_text = render_prompt(tokenizer, msgs[:-1])  # exactly what serving sends
        full_text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prefix = tokenizer(prefix_text, add_special_tokens=False).input_ids
        full = tokenizer(full_text, add_special_tokens=False).input_ids
        if full[:len(prefix)] != prefix:
            raise TunewireError(R.DATASET_INVALID, "the chat template renders the conversation "
                                "without the generation prompt as a prefix, so the assistant turn "
                                "cannot be told apart; use prompt/completion rows instead")
        answer = full[len(prefix):]
        end = next((i for i, t in enumerate(answer) if t in eos_ids), None)
        # Keep the answer through its end-of-turn token; the template's text after it is never
        # generated. A template that does not end turns with EOS gets one, so the model stops.
        answer = answer[:end + 1] if end is not None else answer + [eos]
        return prefix + answer, [IGNORE] * len(prefix) + answer
    prompt = tokenizer(example["prompt"]).input_ids
    completion = tokenizer(example["completion"], add_special_tokens=False).input_ids + [eos]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def trained_tokens(labels: list[int]) -> int:
    """How many positions carry loss. Position 0 never does: nothing precedes it to predict it."""
    return sum(t != IGNORE for t in labels[1:])


def has_labels(labels: list[int]) -> bool:
    return trained_tokens(labels) > 0


def tokenize_example(example: dict, tokenizer, max_seq_length: int, *,
                     eos_ids: Collection[int] | None = None) -> dict[str, list[int]]:
    """Encodes one example as {input_ids, labels}, labels IGNORE (-100) except on the completion.

    Keeps the first `max_seq_length` tokens. `eos_ids` are the tokens that end an assistant turn
    (the tokenizer's EOS is always one).
    """
    ids, labels = _encode(example, tokenizer, end_ids(tokenizer, eos_ids))
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length]}


def end_ids(tokenizer, eos_ids: Collection[int] | None = None) -> set[int]:
    """The tokens that end a turn: `eos_ids` (e.g. generation_config's) and the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise TunewireError(R.BASE_MODEL_INVALID, "the tokenizer has no EOS token")
    return set(eos_ids or ()) | {tokenizer.eos_token_id}


@dataclass(frozen=True)
class TokenStats:
    examples: int       # examples kept for training
    truncated: int      # of those, how many lost tokens to max_seq_length
    dropped: int        # examples with no labelled token left after truncation (not trained on)
    tokens: int         # tokens in the kept examples
    label_tokens: int   # of those, how many carry loss


def tokenize_dataset(examples: list[dict], tokenizer, max_seq_length: int, *,
                     eos_ids: Collection[int] | None = None) -> tuple[list[dict], TokenStats]:
    """Tokenizes every example, drops those left without labels, and counts what was cut."""
    eos = end_ids(tokenizer, eos_ids)
    rows, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, labels = _encode(ex, tokenizer, eos)
        cut = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if not has_labels(labels):
            dropped += 1
            continue
        truncated += cut
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise TunewireError(R.DATASET_EMPTY, f"none of the {dropped} examples has a completion token "
                            f"within max_seq_length={max_seq_length}, leaving nothing to train on")
    stats = TokenStats(examples=len(rows), truncated=truncated, dropped=dropped,
                       tokens=sum(len(r["input_ids"]) for r in rows),
                       label_tokens=sum(trained_tokens(r["labels"]) for r in rows))
    return rows, stats


def collate(batch: list[dict], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pads a batch to its longest row: input_ids, labels (IGNORE on pads), attention_mask."""
    import torch  # here, not at the top: the trainer service reads files without torch

    width = max(len(r["input_ids"]) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
