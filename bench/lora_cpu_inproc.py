"""LoRA on vLLM's CPU backend, measured in process and interleaved: the model step alone.

bench/lora_cpu.py measures what a client sees (AsyncLLM: a front-end process and an engine-core
process sharing the 2 cores), where one run of a row moves by +-10-15%. This script takes the
front end out and pairs the rows in time: every configuration gets its own `vllm.LLM` in its own
subprocess (VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine runs in that process), all of them are
started first and kept alive, then each *round* (8 prompts x 32 tokens, greedy, ignore_eos) runs
on one engine at a time, round-robin, the order rotated every round. A slow spell of the VM then
hits every row of that round alike, and each LoRA row is reported as the median of its per-round
ratios to base_nolora's run in the same round. The serving default is the compiled path
(TUNEWIRE_CPU_LORA_COMPILE=1, bench/lora_cpu.py's `compiled`).

    .venv/bin/python bench/lora_cpu_inproc.py                          # C++ kernel (default)
    .venv/bin/python bench/lora_cpu_inproc.py --kernel python          # the Python twin
    .venv/bin/python bench/lora_cpu_inproc.py --configs base_nolora,adapter --rounds 20

Also checks the outputs: base requests give the same tokens with LoRA on or off, and the half
workload's rows equal the base and adapter workloads' rows. Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("base_nolora", "base_lora", "adapter", "half")
REF = "base_nolora"


def _worker(config: str, model: str, adapter: str) -> None:
    """Start one engine, say READY, then run one round per line read on stdin."""
    from _common import PROMPTS  # bench/ is on sys.path when run as a script
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora_on = config != REF
    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, max_num_seqs=8,
              enable_lora=lora_on,
              **(dict(max_loras=4, max_lora_rank=16, max_cpu_loras=8) if lora_on else {}))
    lora = LoRARequest("a", 1, adapter) if lora_on else None
    loras = [lora if config == "adapter" or (config == "half" and i % 2) else None
             for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS[:8], params, lora_request=loras, use_tqdm=False)  # warm-up
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("READY " + json.dumps(tokens), flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        llm.generate(PROMPTS[:8], params, lora_request=loras, use_tqdm=False)
        print(f"ROUND {8 * 32 / (time.perf_counter() - t)}", flush=True)


def _read(proc, prefix: str, config: str, log: Path) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    tail = log.read_text(errors="replace")[-4000:]
    raise SystemExit(f"{config}: engine exited (rc {proc.wait()}):\n{tail}")


def check_outputs(tokens: dict) -> list[str]:
    """What differs where it must not (empty: all as expected)."""
    bad = []
    if "base_lora" in tokens and REF in tokens and tokens["base_lora"] != tokens[REF]:
        bad.append("base requests changed when LoRA was enabled")
    if "half" in tokens:
        for i, row in enumerate(tokens["half"]):
            other = "adapter" if i % 2 else ("base_lora" if "base_lora" in tokens else REF)
            if other in tokens and row != tokens[other][i]:
                bad.append(f"half, request {i}: differs from the {other} workload")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=10, help="measured rounds per configuration")
    ap.add_argument("--kernel", choices=("c++", "python"), default="c++",
                    help="tunewire::lora_linear's kernel (TUNEWIRE_CPU_LORA_KERNEL)")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args.worker, args.model, args.adapter)

    import tempfile

    sys.path.insert(0, str(ROOT))
    from lora_cpu import make_adapter
    from tunewire.models import ensure_default_base_model

    configs = [c for c in args.configs.split(",") if c]
    if REF not in configs or not set(configs) <= set(CONFIGS):
        raise SystemExit(f"--configs: a subset of {CONFIGS} that includes {REF}")
    model = str(ensure_default_base_model(progress=print))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TUNEWIRE_CPU_LORA_COMPILE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TUNEWIRE_CPU_LORA_KERNEL", None)
    if args.kernel == "python":
        env["TUNEWIRE_CPU_LORA_KERNEL"] = "python"
    procs, tokens, logs = {}, {}, {}
    runs = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model, Path(tmp) / "adapter")
        try:
            for config in configs:  # one start at a time: starts compete for the 2 cores
                t = time.monotonic()
                logs[config] = Path(tmp) / f"{config}.log"
                with open(logs[config], "w") as err:
                    procs[config] = subprocess.Popen(
                        [sys.executable, __file__, "--worker", config, "--model", model,
                         "--adapter", adapter], env=env, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=err, text=True)
                tokens[config] = json.loads(_read(procs[config], "READY ", config, logs[config]))
                print(f"{config:12s} started in {time.monotonic() - t:.0f} s", flush=True)
            for r in range(args.rounds):
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                for config in order:
                    procs[config].stdin.write("go\n")
                    procs[config].stdin.flush()
                    runs[config].append(float(_read(procs[config], "ROUND ", config, logs[config])))
                print(f"round {r + 1}: " + "  ".join(f"{c} {runs[c][-1]:.1f}" for c in configs),
                      flush=True)
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(timeout=60)
    rows = []
    for config in configs:
        ratios = [x / ref for x, ref in zip(runs[config], runs[REF])]
        rows.append({"config": config, "tok_s": statistics.median(runs[config]),
                     "vs_base_nolora": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "tok_s_runs": runs[config]})
    print(f"\n| workload | tok/s (median) | vs base_nolora, median of per-round ratios [min-max] |"
          f"  (kernel: {args.kernel}, {args.rounds} rounds)\n|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['tok_s']:.1f} | {r['vs_base_nolora']:.2f} "
              f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] |")
    bad = check_outputs(tokens)
    print("outputs: " + ("; ".join(bad) if bad else "as expected (base unchanged by LoRA, "
                         "half = base rows + adapter rows)"))
    if args.out:
        Path(args.out).write_text(json.dumps({"kernel": args.kernel, "rounds": args.rounds,
                                              "outputs_ok": not bad, "results": rows},
                                             indent=2) + "\n")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
