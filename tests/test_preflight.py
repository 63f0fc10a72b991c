"""Data formats, path confinement and the pre-flight report, on the tiny model's tokenizer."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from trainer_service.data_paths import resolve_data_path
from trainer_service.data_rows import example_format, load_examples, scan_file
from trainer_service.data_tokens import encode_example, tokenize_dataset
from trainer_service.preflight import validate_dataset
from tunewire.errors import TunewireError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def pc(i: int) -> dict:
    return {"prompt": f"Extract the person as JSON: p{i} is {20 + i} years old.\n",
            "completion": json.dumps({"name": f"p{i}", "age": 20 + i})}


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


ROWS = {
    "prompt_completion": [pc(0), pc(1), {"prompt": "", "completion": "x, \"quoted\"\nline"}],
    "messages": [chat("alice is 20", '{"age": 20}'), chat("bob?", "no")],
    "text": [{"text": "alice is 20 years old and lives in paris."}, {"text": "bob, oslo"}],
    "classification": [{"text": "good", "label": 1}, {"text": "bad", "label": 0},
                       {"text": "fine", "label": 1}],
}


def to_csv(rows, path) -> str:
    # A chat goes into one CSV cell as JSON text.
    pd.DataFrame([{k: json.dumps(v) if k == "messages" else v for k, v in r.items()}
                  for r in rows]).to_csv(path, index=False)
    return str(path)


def codes(report):
    return [(e.source, e.line, e.field) for e in report.errors]


# -- every bad row, with its line and field -----------------------------------------------------
def test_jsonl_reports_every_bad_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        pc(0),                                                       # 1
        {"prompt": "a"},                                             # 2 completion missing
        "",                                                          # 3 blank: skipped
        {"prompt": 3, "completion": ""},                             # 4 two fields wrong
        '{"prompt": "a", "completion": ',                            # 5 not JSON
        [1, 2],                                                      # 6 not an object
        {"messages": [{"role": "user", "content": "a"}]},            # 7 ends with the user
        {"messages": [{"role": "bot", "content": "a"},
                      {"role": "assistant", "content": 5}]},         # 8 unknown role, bad type
        {"text": "hello"},                                           # 9 another format
        {"foo": 1},                                                  # 10 no known field
        pc(1),                                                       # 11
    ])
    report = validate_dataset(path, tokenizer, 256)
    assert codes(report) == [
        ("train", 2, "completion"), ("train", 4, "prompt"), ("train", 4, "completion"),
        ("train", 5, ""), ("train", 6, ""), ("train", 7, "messages[0].role"),
        ("train", 8, "messages[0].role"), ("train", 8, "messages[1].content"),
        ("train", 9, ""), ("train", 10, "")]
    msgs = [e.message for e in report.errors]
    assert "is missing" in msgs[0] and "must be a string, got integer" in msgs[1]
    assert "must not be empty" in msgs[2] and "not valid JSON" in msgs[3]
    assert "assistant" in msgs[5] and "unknown role 'bot'" in msgs[6]
    assert "is a text row but the file's format is prompt_completion (set by line 1)" in msgs[8]
    assert not report.ok and report.error_count == 10 and report.num_examples == 2
    assert report.format == "prompt_completion" and report.unit == "line"

    capped = validate_dataset(path, tokenizer, 256, max_errors=3)
    assert len(capped.errors) == 3 and capped.error_count == 10
    # load_examples stops at the first of them
    with pytest.raises(TunewireError) as e:
        load_examples(path)
    assert e.value.message.startswith("training data line 2: field completion: is missing")


def test_csv_reports_every_bad_row_by_file_line(tmp_path, tokenizer):
    (tmp_path / "d.csv").write_text(
        "prompt,completion\n"          # 1 header
        "a,b\n"                        # 2
        '"two\nlines",\n'              # 3-4: one record, empty completion: line 3
        "x,y,z\n"                      # 5 too many values
        "\n"                           # 6 blank
        "only\n"                       # 7 too few
        'c,"multi\n\nline"\n'          # 8-10 fine
        "d,\n")                        # 11 empty completion
    report = validate_dataset(tmp_path / "d.csv", tokenizer, 256)
    assert codes(report) == [("train", 3, "completion"), ("train", 5, ""), ("train", 7, ""),
                             ("train", 11, "completion")]
    assert report.num_examples == 2
    assert scan_file(tmp_path / "d.csv").lines == [2, 8]


def test_parquet_problems_name_the_row(tmp_path, tokenizer):
    rows = [pc(0), {"prompt": "a", "completion": None}, pc(2)]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    report = validate_dataset(tmp_path / "d.parquet", tokenizer, 256)
    assert codes(report) == [("train", 2, "completion")] and report.unit == "row"
    with pytest.raises(TunewireError) as e:
        load_examples(tmp_path / "d.parquet")
    assert e.value.reason == "DATASET_INVALID" and "row 2: field completion" in e.value.message


def test_file_problems_are_errors_at_line_0(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    (tmp_path / "e.jsonl").write_text("\n\n")
    for path, needle in [(tmp_path / "nope.jsonl", "no file"), (tmp_path / "d.txt", "supported"),
                         (tmp_path / "d.parquet", "Parquet"),
                         (tmp_path / "e.jsonl", "no examples")]:
        report = validate_dataset(path, tokenizer, 64)
        assert [(e.line, e.field) for e in report.errors] == [(0, "")], path
        assert needle in report.errors[0].message and not report.ok


# -- duplicates and leakage ---------------------------------------------------------------------
def test_duplicates_and_leakage_are_counted_exactly(tmp_path, tokenizer):
    other_answer = {**pc(2), "completion": "something else"}
    train = write_jsonl(tmp_path / "t.jsonl", [pc(0), pc(1), pc(0), pc(2), pc(0), pc(1), pc(3)])
    val = write_jsonl(tmp_path / "v.jsonl", [pc(1), other_answer, pc(9), pc(3), pc(9)])
    report = validate_dataset(train, tokenizer, 256, validation_path=val)
    assert report.ok, report.errors
    assert (report.num_examples, report.num_validation_examples) == (7, 5)
    assert report.duplicates.count == 3
    assert report.duplicates.samples == ((3, 1), (5, 1), (6, 2))
    assert report.leakage.exact.count == 2 and report.leakage.exact.samples == ((1, 2), (4, 7))
    assert report.leakage.input.count == 3
    assert report.leakage.input.samples == ((1, 2), (2, 4), (4, 7))


def test_chat_leakage_compares_the_conversation_before_the_answer(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [chat("q1", "a1"), chat("q2", "a2")])
    val = write_jsonl(tmp_path / "v.jsonl", [chat("q1", "other"), chat("q3", "a2")])
    report = validate_dataset(train, tokenizer, 256, validation_path=val)
    assert report.leakage.exact.count == 0 and report.leakage.input.samples == ((1, 1),)


def test_validation_problems_are_marked_as_such(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [pc(0)])
    val = write_jsonl(tmp_path / "v.jsonl", [pc(1), {"prompt": "a", "completion": 1}])
    report = validate_dataset(train, tokenizer, 256, validation_path=val)
    assert codes(report) == [("validation", 2, "completion")]
    assert report.errors[0].describe() == ("validation data line 2: field completion: must be a "
                                           "string, got integer")
    with pytest.raises(TunewireError, match="^validation data line 2: field completion"):
        load_examples(val, source="validation")  # what training says about the same file
    other = write_jsonl(tmp_path / "w.jsonl", [{"text": "hi"}])
    report = validate_dataset(train, tokenizer, 256, validation_path=other)
    assert codes(report) == [("validation", 0, "")] and "is text" in report.errors[0].message


# -- tokens, truncation, loss coverage ------------------------------------------------------------
def test_lengths_truncation_and_trained_end_tokens(tmp_path, tokenizer):
    rows = [pc(i) for i in range(6)] + [{"prompt": "x " * 60, "completion": "y"}]
    full = [len(encode_example(r, tokenizer)[0]) for r in rows]
    n_prompt = len(tokenizer(pc(0)["prompt"]).input_ids)
    cut = n_prompt + 3                     # every pc(i) is cut inside its completion
    assert all(n > cut for n in full[:6]) and len(tokenizer("x " * 60).input_ids) > cut
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cut)
    assert report.ok, report.errors
    assert (report.truncated, report.dropped) == (6, 1)
    s = sorted(full)
    assert (report.lengths.min, report.lengths.max) == (s[0], s[-1])
    assert report.lengths.mean == pytest.approx(sum(full) / len(full))
    assert report.lengths.p50 == s[3] and report.lengths.p95 == s[6]
    assert report.eos_untrained == 0                # judged on the whole, untruncated example
    assert 0 < report.coverage_min <= report.coverage_mean <= 1
    # what training would see: the same numbers as tokenize_dataset
    _, stats = tokenize_dataset(load_examples(tmp_path / "d.jsonl"), tokenizer, cut)
    assert (stats.truncated, stats.dropped) == (report.truncated, report.dropped)
    assert report.fit.tokens_per_epoch == stats.tokens
    assert report.fit.trained_tokens_per_epoch == stats.label_tokens


def _cut_rows(tokenizer):
    """(cut, short, long, dropped): max_seq_length and rows it keeps whole, cuts, leaves empty."""
    cut = len(tokenizer(pc(0)["prompt"]).input_ids) + 3
    short, drop = {"prompt": "a", "completion": "b"}, {"prompt": "x " * 60, "completion": "y"}
    assert len(encode_example(short, tokenizer)[0]) <= cut < len(encode_example(pc(0), tokenizer)[0])
    assert len(tokenizer(drop["prompt"]).input_ids) > cut   # the completion starts after the cut
    return cut, short, pc(0), drop


def test_truncated_and_dropped_examples_are_named_by_line(tmp_path, tokenizer, monkeypatch):
    from trainer_service import preflight

    cut, short, long, drop = _cut_rows(tokenizer)
    rows = [short, long, {"prompt": 1, "completion": "b"}, drop, short, pc(1)]   # line 3: an error
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = validate_dataset(path, tokenizer, cut)
    assert codes(report) == [("train", 3, "prompt")]          # the same numbering as errors
    assert (report.truncated_lines, report.dropped_lines) == ((2, 6), (4,))
    d = json.loads(json.dumps(report.to_dict()))
    assert (d["truncated_lines"], d["dropped_lines"], d["truncated_lines_unlisted"]) == ([2, 6], [4], 0)
    monkeypatch.setattr(preflight, "LINES_LISTED", 1)
    d = validate_dataset(path, tokenizer, cut).to_dict()
    assert (d["truncated_lines"], d["truncated"], d["truncated_lines_unlisted"]) == ((2,), 2, 1)
    # CSV counts file lines (header: line 1; long's prompt ends in a newline: lines 3-4), Parquet rows
    report = validate_dataset(to_csv([short, long, drop], tmp_path / "d.csv"), tokenizer, cut)
    assert (report.truncated_lines, report.dropped_lines) == ((3,), (5,))
    pd.DataFrame([short, long, drop]).to_parquet(tmp_path / "d.parquet")
    report = validate_dataset(tmp_path / "d.parquet", tokenizer, cut)
    assert (report.unit, report.truncated_lines, report.dropped_lines) == ("row", (2,), (3,))
    rows = ROWS["classification"] + [{"text": "a text far longer than four tokens", "label": 0}]
    assert len(tokenizer(rows[-1]["text"]).input_ids) > 4 >= max(
        len(tokenizer(r["text"]).input_ids) for r in rows[:-1])
    report = validate_dataset(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, 4)
    assert (report.truncated_lines, report.dropped_lines) == ((4,), ())


def test_cli_prints_the_truncated_lines_through_grpc(tmp_path, tokenizer, capsys):
    """`tunewire datasets validate` against a real gRPC server whose ValidateDataset answers with
    the real report conversion: the cut and dropped lines are printed."""
    from concurrent import futures

    import grpc

    from trainer_service.servicer import report_to_proto
    from tunewire.cli import main
    from tunewire.trainer.v1 import trainer_pb2 as tpb
    from tunewire.trainer.v1 import trainer_pb2_grpc

    cut, short, long, drop = _cut_rows(tokenizer)
    path = write_jsonl(tmp_path / "d.jsonl", [long, short, drop, long])

    class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
        def ValidateDataset(self, request, context):
            return tpb.ValidateDatasetResponse(report=report_to_proto(validate_dataset(
                request.training_data.path, tokenizer, request.max_seq_length)))

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(Trainer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        assert main(["--trainer", address, "datasets", "validate", "--base-model", "m", "--data", path,
                     "--max-seq-length", str(cut)]) == 0
    finally:
        server.stop(None)
    out = json.loads(capsys.readouterr().out)
    assert (out["truncated_lines"], out["dropped_lines"], out["truncated"]) == ([1, 4], [3], "2")


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages", "text"])
def test_every_example_trains_its_end_token(tmp_path, tokenizer, fmt):
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS[fmt]), tokenizer, 512)
    assert report.ok and report.format == fmt and report.eos_untrained == 0
    assert (report.truncated, report.dropped) == (0, 0)
    assert 0 < report.coverage_min <= report.coverage_mean <= 1
    if fmt == "text":
        assert report.coverage_min == report.coverage_mean == 1.0
    else:
        assert report.coverage_mean < 1           # the prompt is context, not trained on


def test_text_rows_train_every_token_and_eos(tokenizer):
    (row,), _ = tokenize_dataset([{"text": "bob, oslo"}], tokenizer, 512)
    assert row["input_ids"] == tokenizer("bob, oslo").input_ids + [tokenizer.eos_token_id]
    assert row["labels"] == row["input_ids"]


def test_classification_counts_labels_and_is_not_tokenized_for_lm(tmp_path, tokenizer):
    rows = ROWS["classification"] + [{"text": "meh", "label": 2}]
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 4)
    assert report.ok and report.format == "classification"
    assert report.label_counts == {0: 1, 1: 2, 2: 1} and report.num_classes == 3
    assert report.coverage_mean is None and report.eos_untrained is None
    assert report.fit.trained_tokens_per_epoch is None and report.fit.steps == 1
    json.dumps(report.to_dict())
    with pytest.raises(TunewireError, match="classification data for a feature-extraction"):
        tokenize_dataset([rows[0]], tokenizer, 64)
    bad = write_jsonl(tmp_path / "b.jsonl", [rows[0], {"text": "x"}, {"text": "y", "label": "1"},
                                             {"text": "z", "label": 1.5}])
    assert [(e.line, e.field) for e in validate_dataset(bad, tokenizer, 64).errors] == [
        (2, "label"), (3, "label"), (4, "label")]


# -- fit estimate ------------------------------------------------------------------------------
def test_fit_estimate_for_epochs_and_max_steps(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [pc(i) for i in range(10)])
    report = validate_dataset(path, tokenizer, 512, batch_size=4, num_epochs=3)
    tokens = sum(len(encode_example(pc(i), tokenizer)[0]) for i in range(10))
    assert (report.fit.steps_per_epoch, report.fit.steps, report.fit.epochs) == (3, 9, 3.0)
    assert report.fit.tokens_per_epoch == tokens and report.fit.estimated_seconds is None
    report = validate_dataset(path, tokenizer, 512, batch_size=4, max_steps=7, step_seconds=0.5)
    assert report.fit.steps == 7 and report.fit.epochs == pytest.approx(7 / 3)
    assert report.fit.estimated_seconds == pytest.approx(3.5)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] and d["fit"]["steps"] == 7 and d["lengths"]["max"] == report.lengths.max


# -- formats and files ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(ROWS))
def test_csv_parquet_and_json_give_the_rows_of_jsonl(tmp_path, fmt):
    rows = ROWS[fmt]
    jsonl = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert jsonl == rows
    assert load_examples(tmp_path / "a.json") == rows
    assert load_examples(tmp_path / "d.parquet") == rows
    csv_rows = load_examples(to_csv(rows, tmp_path / "d.csv"))
    if fmt == "classification":  # a CSV cell is text
        rows = [{**r, "label": str(r["label"])} for r in rows]
    assert csv_rows == rows


def test_empty_cells_of_another_format_do_not_count(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion,text\na,b,\n,c,\n')
    assert load_examples(tmp_path / "d.csv") == [{"prompt": "a", "completion": "b"},
                                                 {"prompt": "", "completion": "c"}]
    empty = scan_file(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "", "completion": ""}]))
    assert empty.format == "prompt_completion"
    assert [(i.line, i.field) for i in empty.issues] == [(1, "completion")]


@pytest.mark.parametrize("fmt", list(ROWS))
def test_detect_format(tmp_path, fmt):
    scan = scan_file(write_jsonl(tmp_path / "d.jsonl", ROWS[fmt]))
    assert scan.format == fmt and not scan.issues and scan.examples == ROWS[fmt]
    assert example_format(ROWS[fmt][0]) == fmt


def test_text_rows_with_some_labels_are_classification_missing_labels(tmp_path):
    scan = scan_file(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b", "label": "x"}]))
    assert scan.format == "classification"
    assert [(i.line, i.field) for i in scan.issues] == [(1, "label")]


def test_mixed_formats_are_invalid(tmp_path):
    rows = [pc(0), "", {"text": "a"}, chat("q", "a"), "", "", {"text": "b"}]  # lines 1, 3, 4, 7
    with pytest.raises(TunewireError) as e:
        load_examples(write_jsonl(tmp_path / "m.jsonl", rows))
    assert e.value.reason == "DATASET_INVALID"
    assert e.value.message.startswith("training data line 3: is a text row but the file's "
                                      "format is prompt_completion")
    assert [i.line for i in scan_file(tmp_path / "m.jsonl").issues] == [3, 7]
    with pytest.raises(TunewireError) as e:
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0},
                                                         {"text": "b", "label": 1},
                                                         chat("q", "a")]))
    assert e.value.reason == "DATASET_INVALID" and "line 3: is a messages row" in e.value.message
    with pytest.raises(TunewireError) as e:
        load_examples(write_jsonl(tmp_path / "e.jsonl", []))
    assert e.value.reason == "DATASET_EMPTY"
    # prompt/completion and chat rows both train only the completion, so they may share a file
    both = scan_file(write_jsonl(tmp_path / "b.jsonl", [pc(0), chat("q", "a")]))
    assert both.format == "prompt_completion" and not both.issues


# -- path confinement ----------------------------------------------------------------------------
def test_resolve_data_path_confines_to_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "sub" / "t.jsonl", root / "t.csv", root / "t.txt", outside / "x.jsonl"):
        p.write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside / "x.jsonl")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "ok-link.jsonl").symlink_to(root / "sub" / "t.jsonl")
    field = "training_job.training_data.path"
    real = (root / "sub" / "t.jsonl").resolve()

    for good in ["sub/t.jsonl", str(root / "sub" / "t.jsonl"), "sub/../sub/t.jsonl",
                 "ok-link.jsonl"]:
        assert resolve_data_path(good, root, field) == real, good
    assert resolve_data_path("t.csv", str(root), field) == (root / "t.csv").resolve()

    cases = [("../outside/x.jsonl", "DATASET_PATH_INVALID"),
             ("sub/../../outside/x.jsonl", "DATASET_PATH_INVALID"),
             (str(outside / "x.jsonl"), "DATASET_PATH_INVALID"),
             ("/etc/passwd", "DATASET_PATH_INVALID"),
             ("link.jsonl", "DATASET_PATH_INVALID"),
             ("dirlink/x.jsonl", "DATASET_PATH_INVALID"),
             ("../outside/missing.jsonl", "DATASET_PATH_INVALID"),  # outside first: no probing
             ("t.txt", "DATASET_PATH_INVALID"),
             ("", "DATASET_PATH_INVALID"),
             ("a\0b.jsonl", "DATASET_PATH_INVALID"),
             ("missing.jsonl", "DATASET_NOT_FOUND"),
             ("sub", "DATASET_NOT_FOUND")]
    for path, reason in cases:
        with pytest.raises(TunewireError) as e:
            resolve_data_path(path, root, field)
        assert e.value.reason == reason, path
        assert list(e.value.field_violations) == [field] and e.value.message.startswith(field)
        if "link" in path:
            assert str(outside) not in e.value.message  # never says where a link leads
