"""bench/serving_frontends.py's arithmetic on synthetic numbers: the round order rotates so each
side takes every position, each ratio is the median of per-round ratios (not a ratio of medians)
with its [min, max], and the output check catches short generations and differing texts."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def fe():
    sys.path.insert(0, str(BENCH))  # the script imports its bench/ neighbours by name
    try:
        spec = importlib.util.spec_from_file_location("serving_frontends", BENCH / "serving_frontends.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _run(tokens: int, wall: float, ttft: float = 10.0, counts=None, texts=None) -> dict:
    return {"tokens": tokens, "wall_s": wall, "ttft_ms_p50": ttft,
            "counts": counts if counts is not None else [32] * (tokens // 32),
            "extra": texts if texts is not None else ["a"] * (tokens // 32)}


def test_rotation_puts_every_side_in_every_position(fe):
    orders = [fe.rotation(fe.SIDES, r) for r in range(6)]
    assert orders[0] == ["inproc", "grpc", "http"]
    assert orders[1] == ["grpc", "http", "inproc"]
    assert orders[2] == ["http", "inproc", "grpc"]
    assert orders[3] == orders[0] and orders[4] == orders[1]
    for o in orders:
        assert sorted(o) == sorted(fe.SIDES)
    for pos in range(3):  # over 3 rounds each side is first, second and third once
        assert sorted(o[pos] for o in orders[:3]) == sorted(fe.SIDES)


def test_ratio_is_the_median_of_per_round_ratios(fe):
    # per-round ratios 0.8, 0.5, 0.9 -> median 0.8 (the ratio of the medians would be 90/100)
    st = fe.ratio_stats([40.0, 100.0, 90.0], [50.0, 200.0, 100.0])
    assert st["median"] == pytest.approx(0.8)
    assert st["ratios"] == pytest.approx([0.8, 0.5, 0.9])
    assert (st["min"], st["max"]) == (pytest.approx(0.5), pytest.approx(0.9))
    st = fe.ratio_stats([50.0, 100.0, 90.0, 80.0], [100.0] * 4)  # even count: mean of the middle two
    assert st["median"] == pytest.approx(0.85)
    with pytest.raises(ValueError):  # rounds must pair up
        fe.ratio_stats([1.0], [1.0, 2.0])


def test_summarize_rows(fe):
    # tokens/s per round: inproc 100, 50, 80; grpc 90, 50, 60; http 100, 40, 84
    tok = {"inproc": [100, 50, 80], "grpc": [90, 50, 60], "http": [100, 40, 84]}
    rounds = [{"order": fe.rotation(fe.SIDES, r), "runs": {
        "1": {s: _run(256, 256 / tok[s][r], ttft=10.0 * (r + 1)) for s in fe.SIDES},
        "8": {s: _run(256, 256 / (2 * tok[s][r])) for s in fe.SIDES}}} for r in range(3)]
    rows = fe.summarize(rounds, [1, 8])
    assert [(r["concurrency"], r["side"]) for r in rows] == [(c, s) for c in (1, 8) for s in fe.SIDES]
    by = {(r["concurrency"], r["side"]): r for r in rows}
    assert by[1, "inproc"]["tok_s_median"] == pytest.approx(80)
    assert "vs_inproc" not in by[1, "inproc"]
    assert by[1, "inproc"]["ttft_ms_p50_median"] == pytest.approx(20.0)
    g = by[1, "grpc"]  # ratios 0.9, 1.0, 0.75
    assert g["vs_inproc"] == pytest.approx(0.9)
    assert (g["vs_inproc_min"], g["vs_inproc_max"]) == (pytest.approx(0.75), pytest.approx(1.0))
    h = by[1, "http"]  # ratios 1.0, 0.8, 1.05
    assert h["vs_inproc"] == pytest.approx(1.0)
    assert h["vs_inproc_rounds"] == pytest.approx([1.0, 0.8, 1.05])
    assert (h["tok_s_min"], h["tok_s_max"]) == (pytest.approx(40), pytest.approx(100))
    # concurrency 8 has every side twice as fast: the ratios are the same
    assert by[8, "grpc"]["vs_inproc"] == pytest.approx(0.9)
    assert by[8, "grpc"]["tok_s_median"] == pytest.approx(2 * statistics.median(tok["grpc"]))
    assert "| 1 | grpc | 60.00 | 0.900 [0.750-1.000] |" in fe.table(rows)


def test_check_outputs(fe):
    good = {"1": {s: _run(64, 1.0, texts=["x", "y"]) for s in fe.SIDES}}
    assert fe.check_outputs([{"runs": good}], 32) == []
    short = {"1": {**good["1"], "grpc": _run(64, 1.0, counts=[32, 31], texts=["x", "y"])}}
    other = {"1": {**good["1"], "http": _run(64, 1.0, texts=["x", "z"])}}
    bad = fe.check_outputs([{"runs": good}, {"runs": short}, {"runs": other}], 32)
    assert bad == ["round 2, c=1, grpc: token counts [32, 31]",
                   "round 3, c=1, http: text differs from inproc for prompts [1]"]
