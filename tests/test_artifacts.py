"""Fast tests of trainer_service.artifacts: the per-job metrics CSV and loss-curve PNG, built from
hand-made history entries."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from trainer_service.artifacts import (METRIC_COLUMNS, plot_loss_curve, write_job_artifacts,
                                       write_metrics_csv)
from trainer_service.store import Entry

pytestmark = pytest.mark.timeout(60)
BASE_HEADER = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second",
               "tokens_seen", "step_seconds"]


class History:
    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, kind: str, payload: dict) -> None:
        self.entries.append(Entry(len(self.entries) + 1, 1000.0 + len(self.entries), kind, payload))

    def metric(self, step: int, loss: float) -> None:
        self.add("metric", {"step": step, "epoch": step / 4, "loss": loss, "learning_rate": 0.001,
                            "grad_norm": 0.5, "tokens_per_second": 100.0, "tokens_seen": 64 * step,
                            "total_steps": 4, "step_seconds": 0.25})

    def evaluation(self, step: int, **metrics: float) -> None:
        self.add("event", {"type": "EVAL_COMPLETED", "message": f"step {step}", "data": {},
                           "metrics": {**metrics, "step": float(step)}})


def _history(**extra_eval) -> list[Entry]:
    h = History()
    h.add("state", {"state": "RUNNING", "error": None})
    h.add("event", {"type": "WORKER_STARTED", "message": "", "data": {"pid": "1"}, "metrics": {}})
    for step, loss in [(1, 2.0), (2, 1.5)]:
        h.metric(step, loss)
    h.evaluation(2, eval_loss=1.75, train_loss=1.75, **extra_eval)
    h.add("event", {"type": "CHECKPOINT_SAVED", "message": "", "data": {"path": "/x"},
                    "metrics": {"step": 2.0, "eval_loss": 1.75, "train_loss": 1.75}})
    for step, loss in [(3, 1.25), (4, 1.0)]:
        h.metric(step, loss)
    h.evaluation(4, eval_loss=1.125, train_loss=1.125, **extra_eval)
    h.add("state", {"state": "SUCCEEDED", "error": None})
    return h.entries


def _read(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _colours(path) -> int:
    img = Image.open(path)
    img.load()
    return len(img.convert("RGB").getcolors(maxcolors=1 << 20))


def test_metrics_csv_rows_and_eval_columns(tmp_path):
    out = write_metrics_csv(_history(), tmp_path / "m.csv")
    assert out == tmp_path / "m.csv"
    assert (tmp_path / "m.csv").read_text() == (
        "step,epoch,loss,learning_rate,grad_norm,tokens_per_second,tokens_seen,step_seconds,"
        "eval_loss,train_loss\n"
        "1,0.25,2.0,0.001,0.5,100.0,64,0.25,,\n"
        "2,0.5,1.5,0.001,0.5,100.0,128,0.25,1.75,1.75\n"
        "3,0.75,1.25,0.001,0.5,100.0,192,0.25,,\n"
        "4,1.0,1.0,0.001,0.5,100.0,256,0.25,1.125,1.125\n")


def test_metrics_csv_extra_eval_metrics_get_sorted_columns(tmp_path):
    rows = _read(write_metrics_csv(_history(macro_f1=0.5, accuracy=0.75), tmp_path / "m.csv"))
    assert rows[0] == BASE_HEADER + ["eval_loss", "accuracy", "macro_f1", "train_loss"]
    assert list(METRIC_COLUMNS) == BASE_HEADER
    by_step = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert by_step["2"]["accuracy"] == "0.75" and by_step["2"]["macro_f1"] == "0.5"
    assert by_step["4"]["eval_loss"] == "1.125"
    assert by_step["1"]["accuracy"] == by_step["3"]["eval_loss"] == ""


def test_metrics_csv_empty_history_is_header_only(tmp_path):
    p = write_metrics_csv([], tmp_path / "sub" / "m.csv")
    assert _read(p) == [BASE_HEADER + ["eval_loss"]]
    # state changes and other events alone make no rows either
    p = write_metrics_csv([Entry(1, 0.0, "state", {"state": "QUEUED", "error": None})],
                          tmp_path / "m2.csv")
    assert _read(p) == [BASE_HEADER + ["eval_loss"]]


def test_metrics_csv_repeated_steps_keep_the_last_report(tmp_path):
    h = History()
    h.metric(1, 2.0)
    h.evaluation(1, eval_loss=3.0)
    h.evaluation(1, eval_loss=2.5)  # a resumed worker reports the evaluation again
    h.evaluation(2, eval_loss=2.0)  # an evaluation on a step without a metric row
    rows = _read(write_metrics_csv(h.entries, tmp_path / "m.csv"))
    assert rows[1][0] == "1" and rows[1][-1] == "2.5"
    assert rows[2] == ["2"] + [""] * 7 + ["2.0"]


def test_loss_curve_png(tmp_path):
    out = plot_loss_curve(_history(), tmp_path / "c.png", title="job 1: lora r=8")
    assert out == tmp_path / "c.png"
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (900, 500)
    assert _colours(out) >= 3
    rgb = img.convert("RGB")
    # both series are drawn: some blue-ish (train) and some orange-ish (validation) pixels
    colours = [c for _, c in rgb.getcolors(maxcolors=1 << 20)]
    assert any(b > 150 and r < 80 for r, g, b in colours)
    assert any(r > 200 and 60 < g < 140 and b < 60 for r, g, b in colours)


def test_loss_curve_one_point_and_no_eval(tmp_path):
    h = History()
    h.metric(1, 2.0)
    out = plot_loss_curve(h.entries, tmp_path / "one.png")
    assert Image.open(out).size == (900, 500)
    assert _colours(out) >= 3
    h.metric(2, 2.0)  # a flat line: the y range must not collapse
    out = plot_loss_curve(h.entries, tmp_path / "flat.png", "flat")
    assert _colours(out) >= 3


def test_loss_curve_no_data_says_so(tmp_path):
    out = plot_loss_curve([], tmp_path / "none.png", "empty")
    img = Image.open(out)
    assert img.size == (900, 500)
    assert _colours(out) >= 3  # background, frame and the (anti-aliased) "no data" text
    centre = img.convert("L").crop((400, 220, 500, 280))  # where the message is written
    assert centre.getextrema()[0] < 100
    # same picture as a history whose losses are not finite
    h = History()
    h.metric(1, float("nan"))
    out2 = plot_loss_curve(h.entries, tmp_path / "nan.png", "empty")
    assert out2.read_bytes() == out.read_bytes()
    # and it is not the same picture as one with data
    h2 = History()
    h2.metric(1, 1.0)
    assert plot_loss_curve(h2.entries, tmp_path / "d.png", "empty").read_bytes() != out.read_bytes()


def test_write_job_artifacts(tmp_path):
    paths = write_job_artifacts(_history(), tmp_path / "job", "job")
    assert paths == {"metrics.csv": tmp_path / "job" / "metrics.csv",
                     "loss_curve.png": tmp_path / "job" / "loss_curve.png"}
    assert all(p.is_file() for p in paths.values())
    assert len(_read(paths["metrics.csv"])) == 5
    assert Image.open(paths["loss_curve.png"]).size == (900, 500)
