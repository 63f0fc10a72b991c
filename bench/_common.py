"""Small helpers shared by the bench/ scripts: percentiles, tables, JSON + optional PNG output."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "bench"


# Prompts shared by the serving and LoRA benchmarks (bench/lora_cpu.py uses the first 8).
PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a bicycle stays upright.",
    "List five facts about the moon.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle to a child.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of a detective novel you invent.",
    "What are the benefits of regular exercise?",
    "Explain the difference between weather and climate.",
    "How do vaccines work?",
    "Write a haiku about autumn leaves.",
    "What is machine learning, in two sentences?",
    "Give three tips for learning a new language.",
    "Describe a busy market in Lisbon.",
    "Why do cats purr?",
]

def pct(values, q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan when empty."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


async def run_workload(send, items: list, concurrency: int) -> dict:
    """send(item) -> (ttft_s, latency_s, completion_tokens, extra); `concurrency` in flight.
    Shared by the serving benches: the in-process engine, the gRPC client and the HTTP client."""
    sem = asyncio.Semaphore(concurrency)

    async def one(item):
        async with sem:
            return await send(item)

    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(it) for it in items])
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in res)
    ttft = [r[0] * 1000 for r in res]
    lat = [r[1] * 1000 for r in res]
    return {"requests": len(items), "concurrency": concurrency, "wall_s": wall, "tokens": tokens,
            "tok_s": tokens / wall, "counts": [r[2] for r in res], "req_s": len(items) / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95),
            "latency_ms_p50": pct(lat, 50), "latency_ms_p95": pct(lat, 95),
            "extra": [r[3] for r in res]}


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def conditions() -> dict:
    """What the numbers were measured on (load average before the run included: shared machine)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"other_bench_processes": other_benches(), "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_at_start": load}


def other_benches() -> list[str]:
    """Command lines of other bench/ scripts running now (the machine may be shared)."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "bench/" in cmd and "python" in cmd and "bench/serving.py" not in cmd:
            found.append(cmd[:200])
    return found


def write_json(name: str, data: dict, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def bar_png(name: str, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
            out_dir: Path = OUT_DIR, ref_line: float | None = None) -> Path | None:
    """A grouped bar chart; returns None (and writes nothing) without matplotlib."""
    if not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(labels) + 2), 3.4))
    for i, (sname, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=sname)
        ax.bar_label(bars, fmt="%.2f" if max(vals or [0]) < 10 else "%.0f", fontsize=7)
    if ref_line is not None:
        ax.axhline(ref_line, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
