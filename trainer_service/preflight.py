"""Pre-flight report on training (and validation) data, before a model is loaded or a step run.

`validate_dataset` reads the files with trainer_service.data_rows (as training does), lists every
row problem (up to
`max_errors`, each with its line or row and field), tokenizes the valid examples exactly as
training does, and measures what decides whether the job is worth running: token lengths against
max_seq_length, how much of each example carries loss and whether its end token is trained,
exact duplicates, validation examples that also occur in training, and the steps and tokens the
job will take. Data problems never raise; they are in `errors` and make `ok` false. The examples
that max_seq_length cuts (`truncated_lines`) or leaves with nothing to learn (`dropped_lines`) are
named by their line or row, numbered as the errors are (the first LINES_LISTED of each; to_dict
adds how many more there are).

    report = validate_dataset("train.jsonl", tokenizer, 512, validation_path="val.jsonl",
                              batch_size=8, num_epochs=3, step_seconds=0.4)
    if not report.ok:
        for e in report.errors:
            print(e.source, e.line, e.field, e.message)
    json.dumps(report.to_dict())
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer_service.data_readers import DatasetIssue
from trainer_service.data_rows import FileScan, load_examples, scan_file
from trainer_service.data_tokens import encode_example, end_ids, trained_tokens
from tunewire import reasons as R
from tunewire.errors import TunewireError

__all__ = ["DatasetIssue", "DatasetReport", "FitEstimate", "Leakage", "LengthStats", "Repeats",
           "validate_dataset"]

SAMPLES = 5  # example pairs kept for duplicates and leakage: enough to find them in the file
LINES_LISTED = 100  # truncated / dropped lines named in the report; the rest are counted


@dataclass(frozen=True)
class LengthStats:
    """Token counts of the examples before truncation (what max_seq_length should cover)."""
    min: int
    mean: float
    p50: int
    p95: int
    max: int


@dataclass(frozen=True)
class Repeats:
    count: int                              # examples that repeat an earlier one
    samples: tuple[tuple[int, int], ...]    # (line, first_line): a repeat and what it repeats


@dataclass(frozen=True)
class Leakage:
    """Validation examples also in training; samples are (validation line, training line)."""
    exact: Repeats   # the whole example
    input: Repeats   # the input side only: prompt, the conversation before the answer, or text


@dataclass(frozen=True)
class FitEstimate:
    steps: int                               # max_steps, or ceil(examples / batch) * epochs
    steps_per_epoch: int
    epochs: float                            # passes over the data that `steps` make
    tokens_per_epoch: int                    # after truncation, of the examples trained on
    trained_tokens_per_epoch: int | None     # of those, carrying loss (None: classification)
    estimated_seconds: float | None          # steps * step_seconds, when step_seconds is known


@dataclass(frozen=True)
class DatasetReport:
    format: str | None                  # data_rows.FORMATS; None when no row has a usable format
    unit: str                           # what the training file's line numbers count: line | row
    num_examples: int                   # valid training rows
    num_validation_examples: int        # valid validation rows
    errors: tuple[DatasetIssue, ...]    # the first max_errors problems, training file first
    error_count: int                    # all problems found
    max_seq_length: int
    lengths: LengthStats | None         # None without examples
    truncated: int                      # examples trained on but cut to max_seq_length
    dropped: int                        # examples left with nothing to learn after the cut
    duplicates: Repeats                 # identical training examples
    leakage: Leakage
    coverage_mean: float | None         # share of predicted tokens carrying loss, per example
    coverage_min: float | None
    eos_untrained: int | None           # examples whose last token is not a trained end token
    label_counts: dict[str | int, int] | None   # classification only
    num_classes: int | None
    fit: FitEstimate
    validation_unit: str = "line"
    truncated_lines: tuple[int, ...] = ()   # the first LINES_LISTED truncated examples' lines (unit)
    dropped_lines: tuple[int, ...] = ()     # the first LINES_LISTED dropped examples' lines (unit)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples become lists when dumped), plus `ok` and how many
        truncated / dropped lines are not listed."""
        return {**asdict(self), "ok": self.ok,
                "truncated_lines_unlisted": self.truncated - len(self.truncated_lines),
                "dropped_lines_unlisted": self.dropped - len(self.dropped_lines)}


def validate_dataset(train_path: str | Path, tokenizer, max_seq_length: int, *,
                     validation_path: str | Path | None = None,
                     eos_ids: Collection[int] | None = None, batch_size: int = 8,
                     num_epochs: int = 1, max_steps: int = 0, step_seconds: float | None = None,
                     max_errors: int = 100) -> DatasetReport:
    """Checks the data files and measures them; see the module docstring.

    `eos_ids` are the extra tokens that end a turn (generation_config's), as for training.
    Raises only for a tokenizer without EOS (BASE_MODEL_INVALID), which is no data problem.
    """
    if batch_size < 1 or num_epochs < 1 or max_steps < 0:
        raise ValueError("batch_size and num_epochs must be >= 1, max_steps >= 0")
    train = scan_file(train_path)
    issues = list(train.issues)
    examples = _as_trained(train, issues)
    if not train.examples and not train.issues:
        issues.append(DatasetIssue(0, "", f"{train.path.name} has no examples"))

    val_examples: list[dict] = []
    val = scan_file(validation_path, "validation") if validation_path else None
    if val is not None:
        issues += val.issues
        val_examples = _as_trained(val, issues)
        if not _compatible(train.format, val.format):
            issues.append(DatasetIssue(0, "", f"validation data is {val.format} but training "
                                              f"data is {train.format}", "validation"))

    if train.format == "classification":
        measured = _measure_classification(examples, train.lines, tokenizer, max_seq_length)
    else:
        measured = _measure_lm(examples, train.lines, tokenizer, max_seq_length, eos_ids, issues)
    if examples and measured["kept"] == 0:
        issues.append(DatasetIssue(0, "", f"none of the {len(examples)} examples has a token to "
                                          f"learn within max_seq_length={max_seq_length}"))

    steps_per_epoch = math.ceil(measured["kept"] / batch_size)
    steps = max_steps if max_steps > 0 else steps_per_epoch * num_epochs
    fit = FitEstimate(
        steps=steps, steps_per_epoch=steps_per_epoch,
        epochs=steps / steps_per_epoch if steps_per_epoch else 0.0,
        tokens_per_epoch=measured["tokens"], trained_tokens_per_epoch=measured["trained"],
        estimated_seconds=steps * step_seconds if step_seconds is not None else None)

    train_keys = _first_lines(examples, train.lines, _whole)
    train_inputs = _first_lines(examples, train.lines, _input)
    val_lines = val.lines if val is not None else []
    issues.sort(key=lambda i: (i.source != "train", i.line))  # stable: field order kept
    labels = measured["labels"]
    return DatasetReport(
        format=train.format, unit=train.unit, num_examples=len(examples),
        num_validation_examples=len(val_examples), errors=tuple(issues[:max_errors]),
        error_count=len(issues), max_seq_length=max_seq_length,
        lengths=_length_stats(measured["lengths"]), truncated=measured["truncated"],
        dropped=measured["dropped"], duplicates=_repeats(examples, train.lines, _whole),
        leakage=Leakage(exact=_found_in(val_examples, val_lines, _whole, train_keys),
                        input=_found_in(val_examples, val_lines, _input, train_inputs)),
        coverage_mean=measured["coverage_mean"], coverage_min=measured["coverage_min"],
        eos_untrained=measured["eos_untrained"], label_counts=labels,
        num_classes=len(labels) if labels is not None else None, fit=fit,
        validation_unit=val.unit if val is not None else "line",
        truncated_lines=tuple(measured["truncated_lines"][:LINES_LISTED]),
        dropped_lines=tuple(measured["dropped_lines"][:LINES_LISTED]))


def _as_trained(scan: FileScan, issues: list[DatasetIssue]) -> list[dict]:
    """The examples as training gets them: through `datasets` when the file is clean, so a file
    the loader rejects (e.g. an extra column whose type changes) shows up here too."""
    if scan.issues or not scan.examples:
        return scan.examples
    try:
        return load_examples(scan.path, scan=scan)
    except TunewireError as e:
        issues.append(DatasetIssue(0, "", e.message, scan.source))
        return scan.examples


def _compatible(a: str | None, b: str | None) -> bool:
    # The same mixes data_rows.scan_file allows within one file.
    return a is None or b is None or a == b or {a, b} == {"prompt_completion", "messages"}


def _measure_lm(examples: list[dict], lines: list[int], tokenizer, max_seq_length: int,
                eos_ids: Collection[int] | None, issues: list[DatasetIssue]) -> dict:
    """Token counts, truncation, loss coverage and end-token training, from data_tokens' encoding
    (the very labels training uses)."""
    ends = end_ids(tokenizer, eos_ids)
    lengths, coverage, tokens, trained_total = [], [], 0, 0
    truncated, dropped, eos_untrained = [], [], 0
    for ex, line in zip(examples, lines):
        try:
            ids, labels = encode_example(ex, tokenizer, eos_ids=eos_ids)
        except TunewireError as e:  # e.g. a chat template that does not extend its own prefix
            if e.reason == R.BASE_MODEL_INVALID:
                raise
            issues.append(DatasetIssue(line, "messages" if "messages" in ex else "", e.message))
            continue
        lengths.append(len(ids))
        # The check holds on the whole sequence; cutting it off is counted as truncation.
        eos_untrained += not (ids[-1] in ends and labels[-1] == ids[-1])
        kept = labels[:max_seq_length]
        trained = trained_tokens(kept)
        if trained == 0:
            dropped.append(line)
            continue
        if len(ids) > max_seq_length:
            truncated.append(line)
        tokens += len(kept)
        trained_total += trained
        coverage.append(trained / (len(kept) - 1))  # position 0 is never predicted
    return {"lengths": lengths, "kept": len(coverage), "truncated": len(truncated),
            "truncated_lines": truncated, "dropped": len(dropped), "dropped_lines": dropped,
            "tokens": tokens, "trained": trained_total, "eos_untrained": eos_untrained,
            "coverage_mean": sum(coverage) / len(coverage) if coverage else None,
            "coverage_min": min(coverage) if coverage else None, "labels": None}


def _measure_classification(examples: list[dict], lines: list[int], tokenizer,
                            max_seq_length: int) -> dict:
    # A feature-extraction method reads the text with the tokenizer's own special tokens.
    lengths = [len(tokenizer(ex["text"]).input_ids) for ex in examples]
    cut = [line for n, line in zip(lengths, lines) if n > max_seq_length]
    return {"lengths": lengths, "kept": len(examples), "truncated": len(cut),
            "truncated_lines": cut, "dropped": 0, "dropped_lines": [],
            "tokens": sum(min(n, max_seq_length) for n in lengths), "trained": None,
            "eos_untrained": None, "coverage_mean": None, "coverage_min": None,
            "labels": dict(sorted(Counter(ex["label"] for ex in examples).items()))}


def _length_stats(lengths: list[int]) -> LengthStats | None:
    if not lengths:
        return None
    s = sorted(lengths)

    def rank(p: float) -> int:  # nearest-rank percentile: always a length that occurs
        return s[max(math.ceil(p * len(s)), 1) - 1]

    return LengthStats(min=s[0], mean=sum(s) / len(s), p50=rank(0.5), p95=rank(0.95), max=s[-1])


def _whole(ex: dict) -> str:
    return json.dumps(ex, sort_keys=True, ensure_ascii=False)


def _input(ex: dict) -> str:
    """What the model is given: the prompt, the turns before the answer, or the text."""
    if "messages" in ex:
        return _whole({"messages": ex["messages"][:-1]})
    if "prompt" in ex:
        return _whole({"prompt": ex["prompt"]})
    return _whole({"text": ex["text"]})


def _first_lines(examples: Sequence[dict], lines: Sequence[int], key) -> dict[str, int]:
    first: dict[str, int] = {}
    for ex, line in zip(examples, lines):
        first.setdefault(key(ex), line)
    return first


def _repeats(examples: Sequence[dict], lines: Sequence[int], key) -> Repeats:
    first: dict[str, int] = {}
    count, samples = 0, []
    for ex, line in zip(examples, lines):
        k = key(ex)
        if k in first:
            count += 1
            if len(samples) < SAMPLES:
                samples.append((line, first[k]))
        else:
            first[k] = line
    return Repeats(count, tuple(samples))


def _found_in(examples: Sequence[dict], lines: Sequence[int], key,
              train: dict[str, int]) -> Repeats:
    hits = [(line, train[k]) for ex, line in zip(examples, lines) if (k := key(ex)) in train]
    return Repeats(len(hits), tuple(hits[:SAMPLES]))
