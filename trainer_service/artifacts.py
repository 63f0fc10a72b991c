"""Per-job artifacts made from a job's stored history: a metrics CSV and a loss-curve PNG.

Pure functions over `store.Entry` lists (what `JobStore.history` returns), no grpc and no torch;
the plot is drawn with Pillow's ImageDraw only.

* `write_metrics_csv` writes one row per training step (from the "metric" entries) with the
  step's numbers, plus one column per evaluation metric (from the "EVAL_COMPLETED" events:
  `eval_loss` always, then any other names found, e.g. `accuracy`, `macro_f1`, `train_loss` —
  the latter is the mean training loss over the evaluation's interval), filled on the steps where
  an evaluation happened and empty elsewhere.
* `plot_loss_curve` draws the training loss per step (a line) and the validation loss at the
  evaluation steps (a line with markers), with axes, ticks, a legend and a title.
* `write_job_artifacts` writes both into a job's directory.

Repeated steps (a resumed worker may report an evaluation again) keep the last value reported.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from trainer_service.store import Entry

__all__ = ["METRIC_COLUMNS", "write_metrics_csv", "plot_loss_curve", "write_job_artifacts"]

METRIC_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second",
                  "tokens_seen", "step_seconds")
_INT_COLUMNS = ("step", "tokens_seen")
EVAL_EVENT = "EVAL_COMPLETED"


# -- reading the history -----------------------------------------------------------------------
def _training_points(entries: list[Entry]) -> dict[int, dict]:
    """step -> that step's metric payload (the last one reported for the step)."""
    points: dict[int, dict] = {}
    for e in entries:
        if e.kind == "metric" and e.payload.get("step") is not None:
            points[int(e.payload["step"])] = e.payload
    return points


def _evaluations(entries: list[Entry]) -> dict[int, dict[str, float]]:
    """step -> the evaluation's metrics (without "step"). An evaluation event without a step is
    put on the last training step reported before it."""
    evals: dict[int, dict[str, float]] = {}
    last_step = 0
    for e in sorted(entries, key=lambda x: x.seq):
        if e.kind == "metric" and e.payload.get("step") is not None:
            last_step = int(e.payload["step"])
        elif e.kind == "event" and e.payload.get("type") == EVAL_EVENT:
            metrics = dict(e.payload.get("metrics") or {})
            step = metrics.pop("step", None)
            step = int(round(step)) if step is not None else last_step
            evals[step] = metrics
    return evals


def _eval_columns(evals: dict[int, dict[str, float]]) -> list[str]:
    names = {k for m in evals.values() for k in m} - {"eval_loss"}
    return ["eval_loss", *sorted(names)]


def _cell(value, integral: bool = False) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if integral and isinstance(value, (int, float)) and math.isfinite(value):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


# -- CSV ---------------------------------------------------------------------------------------
def write_metrics_csv(entries: list[Entry], path: Path) -> Path:
    """Writes the job's per-step metrics as CSV and returns `path`.

    Columns: METRIC_COLUMNS, then `eval_loss`, then the other evaluation metric names found
    (sorted). Rows are sorted by step; an evaluation at a step with no training row gets a row of
    its own (training columns empty). With no metrics the file holds the header only."""
    path = Path(path)
    points = _training_points(entries)
    evals = _evaluations(entries)
    eval_cols = _eval_columns(evals)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([*METRIC_COLUMNS, *eval_cols])
        for step in sorted(set(points) | set(evals)):
            p = points.get(step, {})
            m = evals.get(step, {})
            row = [_cell(step, True)]
            row += [_cell(p.get(c), c in _INT_COLUMNS) for c in METRIC_COLUMNS[1:]]
            row += [_cell(m.get(c)) for c in eval_cols]
            w.writerow(row)
    return path


# -- plot --------------------------------------------------------------------------------------
WIDTH, HEIGHT = 900, 500
_BG = (255, 255, 255)
_AXIS = (60, 60, 60)
_GRID = (225, 225, 225)
_TEXT = (30, 30, 30)
_TRAIN = (31, 119, 180)   # blue
_EVAL = (230, 100, 10)    # orange
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 80, 30, 50, 60


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_step(span: float, target: int) -> float:
    """A 1/2/5 x 10^k step giving about `target` intervals over `span`."""
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _ticks(lo: float, hi: float, target: int, integral: bool = False) -> tuple[float, float, list[float]]:
    """A padded-out range covering [lo, hi] and the tick values in it."""
    if hi - lo <= 0:
        pad = 1.0 if integral or lo == 0 else abs(lo) * 0.1
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    if integral:
        step = max(1.0, round(step))
    lo = math.floor(lo / step) * step
    hi = math.ceil(hi / step) * step
    n = int(round((hi - lo) / step))
    return lo, hi, [lo + i * step for i in range(n + 1)]


def _tick_label(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if abs(v) < step * 1e-6:
        v = 0.0
    return f"{v:.{decimals}f}"


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..."


def _finite(pairs) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in pairs
            if y is not None and isinstance(y, (int, float)) and math.isfinite(y)]


def plot_loss_curve(entries: list[Entry], path: Path, title: str = "") -> Path:
    """Draws training loss per step and validation loss at evaluation steps as a PNG (900x500).

    With nothing to plot the image says "no data". Returns `path`."""
    path = Path(path)
    points = _training_points(entries)
    evals = _evaluations(entries)
    train = _finite((s, points[s].get("loss")) for s in sorted(points))
    val = _finite((s, evals[s].get("eval_loss")) for s in sorted(evals))

    img = Image.new("RGB", (WIDTH, HEIGHT), _BG)
    draw = ImageDraw.Draw(img)
    f_title, f_label, f_tick = _font(18), _font(14), _font(12)

    if title:
        title = _fit(draw, title, f_title, WIDTH - 40)
        tw, _ = _text_size(draw, title, f_title)
        draw.text(((WIDTH - tw) / 2, 14), title, fill=_TEXT, font=f_title)

    x0, y0 = _MARGIN_L, _MARGIN_T                       # plot area, top-left
    x1, y1 = WIDTH - _MARGIN_R, HEIGHT - _MARGIN_B      # bottom-right

    if not train and not val:
        draw.rectangle((x0, y0, x1, y1), outline=_GRID, width=1)
        msg = "no data"
        tw, th = _text_size(draw, msg, f_title)
        draw.text(((x0 + x1 - tw) / 2, (y0 + y1 - th) / 2), msg, fill=_AXIS, font=f_title)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
        return path

    xs = [x for x, _ in train + val]
    ys = [y for _, y in train + val]
    xlo, xhi, xticks = _ticks(min(xs), max(xs), 8, integral=True)
    ylo, yhi, yticks = _ticks(min(ys), max(ys), 6)
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0

    def px(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    # grid and tick labels
    for t in yticks:
        y = py(t)
        draw.line((x0, y, x1, y), fill=_GRID, width=1)
        draw.line((x0 - 5, y, x0, y), fill=_AXIS, width=1)
        label = _tick_label(t, ystep)
        tw, th = _text_size(draw, label, f_tick)
        draw.text((x0 - 9 - tw, y - th / 2 - 2), label, fill=_TEXT, font=f_tick)
    for t in xticks:
        x = px(t)
        draw.line((x, y0, x, y1), fill=_GRID, width=1)
        draw.line((x, y1, x, y1 + 5), fill=_AXIS, width=1)
        label = _tick_label(t, xstep)
        tw, _ = _text_size(draw, label, f_tick)
        draw.text((x - tw / 2, y1 + 8), label, fill=_TEXT, font=f_tick)

    # axes and axis labels
    draw.line((x0, y0, x0, y1), fill=_AXIS, width=1)
    draw.line((x0, y1, x1, y1), fill=_AXIS, width=1)
    tw, th = _text_size(draw, "step", f_label)
    draw.text(((x0 + x1 - tw) / 2, HEIGHT - th - 12), "step", fill=_TEXT, font=f_label)
    lw, lh = _text_size(draw, "loss", f_label)
    ylabel = Image.new("RGBA", (lw + 4, lh + 6), (0, 0, 0, 0))
    ImageDraw.Draw(ylabel).text((2, 0), "loss", fill=_TEXT, font=f_label)
    ylabel = ylabel.rotate(90, expand=True)
    img.paste(ylabel, (12, int((y0 + y1 - ylabel.height) / 2)), ylabel)

    # the curves
    if len(train) > 1:
        draw.line([(px(x), py(y)) for x, y in train], fill=_TRAIN, width=2, joint="curve")
    if len(train) == 1 or len(train) <= 40:  # few points: mark each one
        r = 2.5 if len(train) > 1 else 4
        for x, y in train:
            draw.ellipse((px(x) - r, py(y) - r, px(x) + r, py(y) + r), fill=_TRAIN)
    if len(val) > 1:
        draw.line([(px(x), py(y)) for x, y in val], fill=_EVAL, width=2, joint="curve")
    for x, y in val:
        r = 5
        draw.ellipse((px(x) - r, py(y) - r, px(x) + r, py(y) + r), fill=_BG, outline=_EVAL, width=2)

    # legend (top right, inside the plot area)
    items = ([("train loss", _TRAIN, False)] if train else []) + \
            ([("validation loss", _EVAL, True)] if val else [])
    row_h, swatch = 20, 28
    text_w = max(_text_size(draw, name, f_label)[0] for name, _, _ in items)
    box_w, box_h = swatch + 14 + text_w + 12, row_h * len(items) + 10
    bx1, by0 = x1 - 10, y0 + 10
    bx0 = bx1 - box_w
    draw.rectangle((bx0, by0, bx1, by0 + box_h), fill=_BG, outline=(180, 180, 180))
    for i, (name, color, marker) in enumerate(items):
        cy = by0 + 5 + row_h * i + row_h / 2
        draw.line((bx0 + 8, cy, bx0 + 8 + swatch, cy), fill=color, width=2)
        if marker:
            mx = bx0 + 8 + swatch / 2
            draw.ellipse((mx - 4, cy - 4, mx + 4, cy + 4), fill=_BG, outline=color, width=2)
        _, th = _text_size(draw, name, f_label)
        draw.text((bx0 + 8 + swatch + 6, cy - th / 2 - 3), name, fill=_TEXT, font=f_label)

    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def write_job_artifacts(entries: list[Entry], job_dir: Path, title: str) -> dict[str, Path]:
    """Writes `job_dir/metrics.csv` and `job_dir/loss_curve.png`; returns {file name: path}.
    Each file is written under a temporary name and renamed, so readers never see half a file."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, write in (("metrics.csv", lambda p: write_metrics_csv(entries, p)),
                        ("loss_curve.png", lambda p: plot_loss_curve(entries, p, title))):
        tmp = job_dir / f".tmp-{name}"
        write(tmp)
        out[name] = tmp.replace(job_dir / name)
    return out
