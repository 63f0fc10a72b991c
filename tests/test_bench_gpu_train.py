"""bench/gpu_train.py --smoke: the GPU check's code runs end to end on the CPU, so it works the
first time a GPU is lent. On a CPU the CUDA rows must say why they have no numbers and claim none;
the CPU rows (correctness on the CPU, the speed machinery on tiny shapes, the fit estimate) carry
real numbers, which the test recomputes from the raw runs the JSON records."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
# Keys that hold a measurement: a row that has one claims a number.
NUMBERS = ("value", "tokens_per_s", "peak_bytes", "mfu", "vs_hf", "estimate_bytes",
           "measured_bytes", "logit_mean_abs_diff", "kl_mean", "tokens", "seconds")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_train")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a machine with a GPU
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=280,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_train_smoke.json").read_text()), out, proc.stdout


def test_every_part_has_rows_and_none_failed(smoke):
    data, out, stdout = smoke
    rows = data["rows"]
    assert {r["part"] for r in rows} == {"a", "b", "c"}
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    for r in rows:  # numbers or an explicit reason
        assert "skipped" in r or any(k in r for k in NUMBERS), r
    table = (out / "gpu_train_smoke.md").read_text()
    assert "skipped: no CUDA" in table and table.strip() in stdout


def test_cuda_rows_claim_no_number(smoke):
    rows = smoke[0]["rows"]
    cuda = [r for r in rows if r["device"] == "cuda"]
    # a: 2 comparisons + resume; b: 4 sides x 2 shapes + 2 QLoRA; c: the GPU fit
    assert len(cuda) >= 3 + 8 + 2 + 1
    for r in cuda:
        assert r["skipped"] == "skipped: no CUDA", r
        assert not [k for k in NUMBERS if k in r], r
    # no CPU row reports GPU-only readings either
    for r in rows:
        if r["part"] == "b" and r["device"] == "cpu":
            assert r["peak_bytes"] is None and r["mfu"] is None, r


def test_correctness_rows_on_cpu(smoke):
    a = {r["case"]: r for r in smoke[0]["rows"] if r["part"] == "a" and r["device"] == "cpu"}
    assert set(a) == {"bf16 vs cpu fp32", "resume fp32 at step 5"}
    for r in a.values():
        # recomputed by hand from the two loss curves
        by_hand = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], r["reference"]))
        assert len(r["losses"]) == len(r["reference"]) == 10
        assert r["value"] == pytest.approx(by_hand, rel=1e-9, abs=1e-15)
        assert r["ok"] is True
    assert a["resume fp32 at step 5"]["value"] <= 1e-4  # fp32 on the same CPU continues exactly
    assert 0 < a["bf16 vs cpu fp32"]["value"] <= 2e-2  # bf16 really rounds, within the bound


def test_speed_machinery_on_tiny_shapes(smoke):
    b = {r["side"]: r for r in smoke[0]["rows"]
         if r["part"] == "b" and r.get("shape") == "tiny"}
    assert {"ours", "hf", "ours-packed"} <= set(b)
    for r in b.values():
        assert r["runs"], r
        tps = [run["tokens"] / run["seconds"] for run in r["runs"]]
        assert r["tokens_per_s"] == pytest.approx(statistics.median(tps))
        assert all(run["tokens"] > 0 and run["steps_timed"] == 2 for run in r["runs"])
    pairs = list(zip(b["ours"]["runs"], b["hf"]["runs"]))
    ratio = statistics.median(o["tokens"] / o["seconds"] / (h["tokens"] / h["seconds"]) for o, h in pairs)
    assert b["ours"]["vs_hf"] == pytest.approx(ratio)


def test_fit_estimate_rows_on_cpu(smoke):
    c = [r for r in smoke[0]["rows"] if r["part"] == "c" and r["device"] == "cpu"]
    assert c
    for r in c:
        assert r["estimate_bytes"] > 0 and r["measured_bytes"] > 0
        assert r["value"] == pytest.approx(r["estimate_bytes"] / r["measured_bytes"])
