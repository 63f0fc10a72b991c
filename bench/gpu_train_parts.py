"""The parts of bench/gpu_train.py: (a) correctness, (b) speed + QLoRA, (c) the fit estimate.

Each part returns result rows (dicts). A row carries measured numbers, or `skipped` with the
reason (no CUDA, a package missing, the time budget spent), or `error`: never a made-up number.

    ctx = Context(out=Path("docs/bench/gpu"), cuda=True, smoke=False, deadline=...)
    rows = part_a(ctx) + part_b(ctx, "8b", budget_s=200) + part_c(ctx, rows)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from gpu_train_data import SHAPES, build_model, write_rows
from gpu_train_sides import Recorder, Side, spec_for

NO_CUDA = "skipped: no CUDA"
# Part (a). fp32 on CUDA vs the CPU: the same maths in a different summation order, ~1e-6
# relative per op (fp32 unit roundoff 6e-8 x reduction depth); 1e-3 is the bound.
FP32_LOSS_RTOL = 1e-3
# bf16 vs fp32: bf16 keeps 8 significant bits, unit roundoff u = 2^-8 = 3.9e-3 per rounding.
# The loss is a log-softmax of logits that went through ~10 rounded ops per layer (weights,
# matmul outputs, norms); independent roundings add up like a random walk, a few u relative
# on the logits, and the loss (an average over every labelled token) keeps about that relative
# error. Over 20 steps the adapters differ by updates of size lr x (a few u), small next to
# that. Bound: 5u ~ 2e-2 relative per step (CPU bf16 autocast measures well inside it, see the
# smoke run's "bf16 vs fp32 (cpu)" row in docs/bench/gpu_train.md).
BF16_LOSS_RTOL = 2e-2
A_STEPS, A_BATCH, A_STOP_AT, A_EVAL_EVERY = 20, 4, 10, 5  # the resume state exists at step 10
A_SMOKE_STEPS, A_SMOKE_STOP_AT = 10, 5   # --smoke: bf16 autocast on a CPU is ~5x slower than fp32
# Resume is checked in the precision a job on that device runs in by default (auto).
RESUME_PRECISION = {"cuda": "bf16", "cpu": "fp32"}


@dataclass
class Context:
    out: Path                   # where the JSON and table go (models and data go to a temp dir)
    cuda: bool                  # a CUDA GPU is visible
    smoke: bool                 # tiny shapes, CPU sides, few steps
    deadline: float             # time.monotonic() by which everything must be done
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpu_train-")))
    built: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def model(self, shape: str) -> Path:
        """The shape's model directory, built once (on the GPU in bf16 when there is one; the
        tiny model in fp32 on the CPU, so fp32 runs on both devices load the same weights)."""
        if shape not in self.built:
            t0 = time.perf_counter()
            on_gpu = self.cuda and shape != "tiny"
            self.built[shape] = build_model(self.work / f"model-{shape}", SHAPES[shape],
                                            device="cuda" if on_gpu else "cpu",
                                            dtype="bf16" if on_gpu else "fp32")
            print(f"  built {shape} model in {time.perf_counter() - t0:.1f} s", flush=True)
        return self.built[shape]


def rel_diff(a: list[float], b: list[float]) -> float:
    """Largest per-step |a - b| / |b| (inf when the lengths differ)."""
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


# ---- (a) correctness ------------------------------------------------------------------------

def part_a(ctx: Context) -> list[dict]:
    """The tiny model, 20 LoRA steps through the recipe on each device and precision."""
    from trainer_service import recipe_lora, resume

    steps, stop_at = (A_SMOKE_STEPS, A_SMOKE_STOP_AT) if ctx.smoke else (A_STEPS, A_STOP_AT)
    model = ctx.model("tiny")
    data = ctx.work / "a.jsonl"
    write_rows(data, n=steps * A_BATCH, lo=16, hi=128, vocab=SHAPES["tiny"].vocab)
    base = Side(side="ours", model=str(model), data=str(data), device="cpu", precision="fp32",
                steps=steps, batch_size=A_BATCH, grad_accum=1, max_seq_length=128)

    def train(device: str, precision: str, out: Path | None = None, stop_at: int = 0):
        spec = spec_for(replace(base, device=device, precision=precision))
        spec = replace(spec, eval=replace(spec.eval, eval_every_steps=A_EVAL_EVERY))
        rec = Recorder(device)
        out = out or Path(tempfile.mkdtemp(dir=ctx.work))
        try:
            recipe_lora.run(spec, out, rec, lambda: bool(stop_at) and rec.last_step >= stop_at,
                            device=device)
        except recipe_lora.Cancelled:
            pass
        return [p["loss"] for p in rec.points], rec

    rows: list[dict] = []
    ref, _ = train("cpu", "fp32")

    def compare(case: str, device: str, precision: str, rtol: float, reference=ref) -> dict:
        row = {"part": "a", "case": case, "device": device, "target": f"<= {rtol:g} rel"}
        if device == "cuda" and not ctx.cuda:
            return {**row, "skipped": NO_CUDA}
        losses, _ = train(device, precision)
        d = rel_diff(losses, reference)
        return {**row, "value": d, "ok": d <= rtol, "losses": losses, "reference": reference}

    rows.append(compare("fp32 vs cpu fp32", "cuda", "fp32", FP32_LOSS_RTOL))
    rows.append(compare("bf16 vs cpu fp32", "cuda", "bf16", BF16_LOSS_RTOL))
    rows.append(compare("bf16 vs cpu fp32", "cpu", "bf16", BF16_LOSS_RTOL))
    for device in ("cuda", "cpu"):  # resume: stop after stop_at steps, run again, compare
        prec = RESUME_PRECISION[device]
        tol = resume.TOLERANCE[prec]
        row = {"part": "a", "case": f"resume {prec} at step {stop_at}", "device": device,
               "target": f"probe and steps {stop_at + 1}-{steps} <= {tol:g} rel"}
        if device == "cuda" and not ctx.cuda:
            rows.append({**row, "skipped": NO_CUDA})
            continue
        whole = ref if (device, prec) == ("cpu", "fp32") else train(device, prec)[0]
        out = Path(tempfile.mkdtemp(dir=ctx.work))
        first, _ = train(device, prec, out, stop_at=stop_at)
        rest, rec = train(device, prec, out)
        resumed = [m for k, _, _, m in rec.events if k == "RESUMED"]
        if len(first) != stop_at or not resumed:
            rows.append({**row, "error": f"stopped after {len(first)} steps, RESUMED events: "
                                         f"{len(resumed)}"})
            continue
        m = resumed[0]
        probe_rel = m["abs_diff"] / max(1.0, abs(m["loss_before"]))
        cont = rel_diff(rest, whole[stop_at:])
        rows.append({**row, "value": max(probe_rel, cont), "probe_abs_diff": m["abs_diff"],
                     "continuation_rel_diff": cont, "ok": probe_rel <= tol and cont <= tol,
                     "losses": first + rest, "reference": whole})
    return rows


# ---- (b) speed, side by side ------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    shape: str
    steps: int                  # optimizer steps per side and round
    batch: int                  # examples per optimizer step
    accum: int                  # micro-batches per step
    lo: int                     # shortest generated row (tokens)
    hi: int                     # longest generated row = max_seq_length
    rounds: int                 # rounds wanted (each side once per round, alternating)


def plan_for(ctx: Context, shape: str) -> Plan:
    if ctx.smoke:
        return Plan(shape, steps=3, batch=4, accum=2, lo=16, hi=128, rounds=2)
    return Plan(shape, steps=8, batch=16, accum=4, lo=64, hi=2048, rounds=2)


def speed_sides(ctx: Context, p: Plan, model: Path, data: Path, mean_tokens: float) -> dict[str, Side]:
    device = "cuda" if ctx.cuda else "cpu"
    precision = "bf16" if ctx.cuda else "fp32"  # bf16 speed is a GPU question; a CPU runs fp32
    common = Side(side="ours", model=str(model), data=str(data), device=device,
                  precision=precision, steps=p.steps, batch_size=p.batch, grad_accum=p.accum,
                  max_seq_length=p.hi)
    # packed rows are max_seq_length long: about as many tokens per step as `batch` rows
    packed = max(1, round(p.batch * mean_tokens / p.hi))
    sides = {"ours": common, "hf": replace(common, side="hf"),
             "ours-packed": replace(common, packing=True, batch_size=packed, grad_accum=packed)}
    if ctx.cuda:  # Triton kernels: CUDA only
        sides["ours-liger"] = replace(common, liger=True)
    return sides


def run_child(side: Side, timeout: float) -> dict:
    """One side in its own process; its RESULT line, or an error / budget row."""
    if timeout < 5:
        return {"skipped": "skipped: time budget spent"}
    cmd = [sys.executable, str(Path(__file__).with_name("gpu_train.py")), "--child",
           json.dumps(asdict(side))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"skipped: time budget spent (stopped after {timeout:.0f} s)"}
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-1500:]}"}
    r = json.loads(line[7:])
    if "skipped" in r and not r["skipped"].startswith("skipped"):
        r["skipped"] = "skipped: " + r["skipped"]
    return r


def part_b(ctx: Context, shape: str, budget_s: float) -> list[dict]:
    """Our recipe vs HF Trainer + PEFT (and variants) on `shape`, alternating over rounds."""
    p = plan_for(ctx, shape)
    label = {"part": "b", "shape": shape, "device": "cuda" if ctx.cuda else "cpu"}
    if not ctx.cuda and shape != "tiny":
        return [{**label, "device": "cuda", "case": "speed", "side": s, "skipped": NO_CUDA}
                for s in ("ours", "hf", "ours-packed", "ours-liger")]
    end = time.monotonic() + min(budget_s, ctx.left())
    model = ctx.model(shape)
    data = ctx.work / f"b-{shape}.jsonl"
    stats = write_rows(data, n=p.steps * p.batch, lo=p.lo, hi=p.hi, vocab=SHAPES[shape].vocab)
    sides = speed_sides(ctx, p, model, data, stats["mean_tokens"])
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    notes: dict[str, dict] = {}
    # Round 1 runs every side; later rounds only ours and hf (the ratio the target is about).
    schedule = [list(sides)] + [["ours", "hf"]] * (p.rounds - 1)
    longest = 0.0  # the slowest side so far: a side starts only if that much time is left
    for rnd, names in enumerate(schedule):
        for name in names:  # alternating: a slow moment hits every side alike
            if name in notes:  # skipped or failed once: not again
                continue
            left = end - time.monotonic()
            if left < 1.1 * longest:
                if not runs[name]:
                    notes[name] = {"skipped": "skipped: time budget spent"}
                print(f"  [{shape} round {rnd + 1}] {name:>11}: no time left", flush=True)
                continue
            t0 = time.monotonic()
            r = run_child(sides[name], left)
            longest = max(longest, time.monotonic() - t0)
            if "tokens" in r:
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                runs[name].append(r)
                print(f"  [{shape} round {rnd + 1}] {name:>11}: {r['tokens_per_s']:9.0f} real tok/s"
                      f"  peak {gib(r.get('peak_bytes'))}  ({r['wall_s']:.0f} s)", flush=True)
            else:
                notes[name] = r
                print(f"  [{shape} round {rnd + 1}] {name:>11}: {r}", flush=True)
    rows = [speed_row(label, name, sides[name], runs[name], notes.get(name), stats)
            for name in sides]
    add_ratios(rows, runs)
    return rows


def gib(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def speed_row(label: dict, name: str, side: Side, runs: list[dict], note: dict | None,
              stats: dict) -> dict:
    row = {**label, "case": "speed", "side": name, "settings": asdict(side), "data": stats,
           "runs": runs}
    if not runs:
        return {**row, **(note or {"skipped": "skipped: time budget spent"})}
    tps = [r["tokens_per_s"] for r in runs]
    peaks = [r["peak_bytes"] for r in runs if r.get("peak_bytes") is not None]
    mfus = [r["mfu"] for r in runs if r.get("mfu") is not None]
    return {**row, "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)],
            "peak_bytes": max(peaks) if peaks else None,
            "mfu": statistics.median(mfus) if mfus else None, "rounds": len(runs),
            **({"note": note} if note else {})}


def add_ratios(rows: list[dict], runs: dict[str, list[dict]]) -> None:
    """ours*/hf: the median over rounds of each round's tokens/s ratio, with its range; and
    whether the side's peak stays at or under HF's."""
    hf = dict(enumerate(runs.get("hf", [])))  # round i's hf run pairs with round i's side run
    hf_row = next((r for r in rows if r["side"] == "hf"), {})
    for row in rows:
        if row["side"] == "hf" or "tokens_per_s" not in row or not hf:
            continue
        ratios = [r["tokens_per_s"] / hf[i]["tokens_per_s"]
                  for i, r in enumerate(runs[row["side"]]) if i in hf]
        if ratios:
            row["vs_hf"] = statistics.median(ratios)
            row["vs_hf_range"] = [min(ratios), max(ratios)]
        if row.get("peak_bytes") is not None and hf_row.get("peak_bytes") is not None:
            row["peak_vs_hf"] = row["peak_bytes"] / hf_row["peak_bytes"]
        if row["shape"] == "8b" and "vs_hf" in row and "peak_vs_hf" in row:
            row["target"] = ">= 1.3x HF tokens/s at <= HF peak"
            row["ok"] = row["vs_hf"] >= 1.3 and row["peak_vs_hf"] <= 1.0
