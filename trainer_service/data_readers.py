"""Reading a data file into raw rows, one reader per file type, each row with its position.

    raw = read_file(Path("train.csv"))   # RawFile(unit="line", rows=[(2, {...}), ...], issues=[...])

JSON Lines (`.jsonl`, or a `.json` of lines), a JSON array (a `.json` starting with `[`), CSV
(`.csv`, header first; a `messages` cell holds the chat as JSON text) and Parquet (`.parquet`).
A row's position is what a person finds in the file: "line N" for JSONL and CSV (the CSV header
is line 1; a quoted record spanning lines is named by its first), "row N" (from 1) for Parquet
and JSON arrays. A problem that makes a line unreadable is a `DatasetIssue` on that line; one
that makes the whole file unreadable is an issue at line 0. Readers never raise for what a file
holds: checking the rows is trainer_service.data_rows, which every method reads through.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer_service.data_paths import EXTENSIONS


@dataclass(frozen=True)
class DatasetIssue:
    line: int            # line (JSONL, CSV) or row (Parquet, JSON array) from 1; 0: the whole file
    field: str           # e.g. "completion", "messages[2].role"; "" when the whole row is at fault
    message: str
    source: str = "train"  # the file: "train" or "validation"

    def describe(self, unit: str = "line") -> str:
        """As one message: "training data line 3: field completion: must not be empty"."""
        what = "validation data" if self.source == "validation" else "training data"
        where = f"{what} {unit} {self.line}" if self.line else what
        return f"{where}: " + (f"field {self.field}: " if self.field else "") + self.message


Raw = list[tuple[int, object]]  # (position, parsed row)


@dataclass(frozen=True)
class RawFile:
    unit: str                               # what positions count: "line" or "row"
    rows: Raw
    issues: list[DatasetIssue]
    columns: tuple[str, ...] = field(default=())  # the CSV header


def read_file(path: Path) -> RawFile:
    """The rows of a data file with their positions, and what kept rows (or the file) unread."""
    suffix = path.suffix.lower()
    unit = "row" if suffix == ".parquet" else "line"
    if suffix not in EXTENSIONS:
        return RawFile(unit, [], [DatasetIssue(0, "", f"{path.name} is not a supported data "
                                                        f"file; use one of {', '.join(EXTENSIONS)}")])
    if not path.is_file():
        return RawFile(unit, [], [DatasetIssue(0, "", f"no file at {path}")])
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return RawFile("line", [], [DatasetIssue(0, "", f"cannot read {path}: {e.strerror}")])
    if suffix == ".csv":
        return _read_csv(data)
    if suffix == ".json" and data.lstrip()[:1] == b"[":
        return _read_json_array(data)
    return _read_jsonl(data)


def _read_jsonl(data: bytes) -> RawFile:
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
    return RawFile("line", rows, issues)


def _read_json_array(data: bytes) -> RawFile:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return RawFile("row", [], [DatasetIssue(0, "", f"not UTF-8 text (line {line})")])
    except json.JSONDecodeError as e:
        return RawFile("row", [], [DatasetIssue(0, "", f"not valid JSON ({e.msg} at line "
                                                       f"{e.lineno} column {e.colno})")])
    return RawFile("row", list(enumerate(items, start=1)), [])


def _read_csv(data: bytes) -> RawFile:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return RawFile("line", [], [DatasetIssue(data[:e.start].count(b"\n") + 1, "",
                                                 "not UTF-8 text")])
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
    return RawFile("line", rows, issues, header or ())


def _read_parquet(path: Path) -> RawFile:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is unusable
        return RawFile("row", [], [DatasetIssue(0, "", f"not a readable Parquet file: "
                                                       f"{type(e).__name__}: {e}")])
    return RawFile("row", list(enumerate(table.to_pylist(), start=1)), [])
