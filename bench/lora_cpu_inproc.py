"""LoRA on vLLM's CPU backend, measured in one process: the model step alone, no front end.

bench/lora_cpu.py measures what a client sees (AsyncLLM: a front-end process and an engine-core
process sharing the 2 cores), where one run of a row moves by +-10-15%. This script takes the
front end out: `vllm.LLM` with VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine in this
process, generating 8 prompts x 32 tokens (greedy, ignore_eos) `--rounds` times after a warm-up
round, so what differs between configurations is the model step (LoRA ops, the per-step LoRA
metadata). Each configuration runs in its own subprocess, one after the other; the serving
default is the compiled path (TUNEWIRE_CPU_LORA_COMPILE=1, as bench/lora_cpu.py's `compiled`).

    .venv/bin/python bench/lora_cpu_inproc.py                          # C++ kernel (default)
    .venv/bin/python bench/lora_cpu_inproc.py --kernel python          # the Python twin
    .venv/bin/python bench/lora_cpu_inproc.py --configs adapter,half --rounds 12

Prints tok/s per configuration and the ratio to base_nolora (LoRA disabled in the engine,
torch.compile on); writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("base_nolora", "base_lora", "adapter", "half")


def _worker(config: str, model: str, adapter: str, rounds: int) -> dict:
    from _common import PROMPTS  # bench/ is on sys.path when run as a script
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora_on = config != "base_nolora"
    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, max_num_seqs=8,
              enable_lora=lora_on,
              **(dict(max_loras=4, max_lora_rank=16, max_cpu_loras=8) if lora_on else {}))
    lora = LoRARequest("a", 1, adapter) if lora_on else None
    loras = [lora if config == "adapter" or (config == "half" and i % 2) else None
             for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm.generate(PROMPTS[:8], params, lora_request=loras, use_tqdm=False)  # warm-up
    t = time.monotonic()
    for _ in range(rounds):
        llm.generate(PROMPTS[:8], params, lora_request=loras, use_tqdm=False)
    wall = time.monotonic() - t
    return {"config": config, "tok_s": rounds * 8 * 32 / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=8, help="measured rounds of 8 x 32 tokens")
    ap.add_argument("--kernel", choices=("c++", "python"), default="c++",
                    help="tunewire::lora_linear's kernel (TUNEWIRE_CPU_LORA_KERNEL)")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args.model, args.adapter, args.rounds)),
              flush=True)
        return

    import tempfile

    sys.path.insert(0, str(ROOT))
    from lora_cpu import make_adapter
    from tunewire.models import ensure_default_base_model

    model = str(ensure_default_base_model(progress=print))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TUNEWIRE_CPU_LORA_COMPILE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TUNEWIRE_CPU_LORA_KERNEL", None)
    if args.kernel == "python":
        env["TUNEWIRE_CPU_LORA_KERNEL"] = "python"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model, Path(tmp) / "adapter")
        for config in [c for c in args.configs.split(",") if c]:
            cmd = [sys.executable, __file__, "--worker", config, "--model", model,
                   "--adapter", adapter, "--rounds", str(args.rounds)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{config} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"{config:12s} {rows[-1]['tok_s']:7.1f} tok/s", flush=True)
    ref = next((r["tok_s"] for r in rows if r["config"] == "base_nolora"), None)
    print(f"\n| workload | tok/s | vs base_nolora |  (kernel: {args.kernel})\n|---|---|---|")
    for r in rows:
        r["vs_base_nolora"] = r["tok_s"] / ref if ref else None
        ratio = f"{r['vs_base_nolora']:.2f}" if ref else "-"
        print(f"| {r['config']} | {r['tok_s']:.1f} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"kernel": args.kernel, "rounds": args.rounds,
                                              "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
