"""Throughput of LoRA on vLLM's CPU backend: base vs adapter requests, plugin fast path on/off.

Reproduces the table of issue 7. Workload: SmolLM2-135M-Instruct
(`tunewire.models.ensure_default_base_model()`), float32, greedy, 32 new tokens per request
(ignore_eos), 8 requests in flight, one r=16 q_proj/v_proj adapter with random weights (peft,
`init_lora_weights=False`). Configurations, each on its own engine in its own subprocess, run
one after the other in one invocation so the numbers sit side by side:

    base_nolora   base requests, LoRA disabled in the engine (the reference, 1.00)
    base_nolora_eager   the same with enforce_eager=True: vLLM turns torch.compile off on CPU
                  whenever LoRA is enabled, so this is the reference without that difference
    base_lora     base requests, LoRA enabled
    adapter       every request on the adapter
    half          half base, half adapter (mixed batches)

Every LoRA configuration runs once per mode of serving_service.cpu_lora (the vLLM general
plugin): `compiled` (the serving default: the fused path with torch.compile kept on and the C++
kernel, TUNEWIRE_CPU_LORA_COMPILE=1), `compiled_py` (the same with the kernel's Python twin),
`fused` (the fused path eager, as vLLM runs LoRA on CPU: compilation off) and `upstream`
(TUNEWIRE_DISABLE_CPU_LORA_FIX=1: vLLM's ops untouched; mixed batches are wrong there). It
prints tok/s and the ratio to base_nolora, checks that the generated token ids of every
configuration are the same in every correct mode, and writes docs/bench/lora_cpu.json.
(The earlier `grouped` and `masked` modes are gone; their numbers are in docs/cpu-lora.md.)

Run (takes minutes: each engine starts in ~35 s, ~90 s compiled; the machine should be
otherwise idle):

    .venv/bin/python bench/lora_cpu.py                       # compiled vs fused
    .venv/bin/python bench/lora_cpu.py --modes fused,upstream --requests 48
    .venv/bin/python bench/lora_cpu.py --modes compiled,compiled+qv --requests 48
    .venv/bin/python bench/lora_cpu.py --modes compiled,compiled_py --requests 48 --repeat 2

`--repeat N` runs the whole plan N times round-robin and reports each row's median run (the
machine drifts by ±10-15% over minutes; one run per row cannot tell 0.9 from 0.85).

A `+qv` suffix on a mode also starts the engine with `lora_target_modules=["q_proj", "v_proj"]`
(the serving setting of the same name): vLLM then wraps only the layers the adapter targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PROMPTS as _COMMON_PROMPTS  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("base_nolora", "base_nolora_eager", "base_lora", "adapter", "half")
NO_LORA = ("base_nolora", "base_nolora_eager")
MODES = ("compiled", "compiled_py", "fused", "upstream")
PROMPTS = _COMMON_PROMPTS[:8]  # shared with bench/serving.py


def make_adapter(base_dir: str, out_dir: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out_dir)
    return str(out_dir)


async def _worker(args) -> dict:
    """One engine, one configuration: warm-up round, then `requests` requests, `concurrency`
    in flight. Returns tok/s and each request's token ids."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    lora_on = args.config not in NO_LORA
    targets = [m for m in (args.targets or "").split(",") if m] or None
    engine_args = AsyncEngineArgs(model=args.model, dtype="float32", max_model_len=512, seed=0,
                                  max_num_seqs=32, enable_lora=lora_on,
                                  **(dict(lora_target_modules=targets) if lora_on and targets else {}),
                                  enforce_eager=args.config == "base_nolora_eager",
                                  **(dict(max_loras=4, max_lora_rank=16, max_cpu_loras=8)
                                     if lora_on else {}))
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(engine_args)
    start_s = time.monotonic() - t0
    lora = LoRARequest("bench-adapter", 1, args.adapter) if lora_on else None
    if lora is not None:
        await engine.add_lora(lora)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    def lora_for(i):
        if args.config == "adapter":
            return lora
        if args.config == "half":
            return lora if i % 2 else None
        return None

    async def one(tag, i):
        ids = []
        async for out in engine.generate(PROMPTS[i % len(PROMPTS)], params, f"{tag}-{i}",
                                         lora_request=lora_for(i)):
            ids = list(out.outputs[0].token_ids)
        return ids

    async def run(tag, n):
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(i):
            async with sem:
                return await one(tag, i)

        t = time.monotonic()
        outs = await asyncio.gather(*[limited(i) for i in range(n)])
        return outs, time.monotonic() - t

    try:
        await run("warm", args.concurrency)
        outs, wall = await run("bench", args.requests)
    finally:
        engine.shutdown()
    tokens = sum(len(o) for o in outs)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "start_s": start_s,
            "token_ids": outs[:len(PROMPTS)]}


def run_config(config: str, mode: str, model: str, adapter: str, args) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TUNEWIRE_DISABLE_CPU_LORA_FIX", None)
    env.pop("TUNEWIRE_CPU_LORA_COMPILE", None)
    env.pop("TUNEWIRE_CPU_LORA_KERNEL", None)
    mode, plus, targets = mode.partition("+")  # "compiled+qv": the engine wraps only q/k/v
    if plus and targets != "qv":
        raise SystemExit(f"unknown mode suffix +{targets} (only +qv)")
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}: one of {MODES}")
    if mode == "upstream":
        env["TUNEWIRE_DISABLE_CPU_LORA_FIX"] = "1"
    elif mode in ("compiled", "compiled_py"):  # fused + torch.compile kept on (cpu_lora_compile.py)
        env["TUNEWIRE_CPU_LORA_COMPILE"] = "1"
        if mode == "compiled_py":  # the op's Python kernel instead of the C++ one
            env["TUNEWIRE_CPU_LORA_KERNEL"] = "python"
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--model", model,
           "--adapter", adapter, "--new-tokens", str(args.new_tokens),
           "--concurrency", str(args.concurrency), "--requests", str(args.requests),
           "--targets", "q_proj,v_proj" if plus else ""]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{config}/{mode} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="compiled,fused",
                    help=f"comma-separated cpu_lora modes, of {', '.join(MODES)}; a +qv suffix "
                         "(e.g. compiled+qv) also sets lora_target_modules=q_proj,v_proj")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="measured requests per config")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole plan this many times, round-robin; rows report the median")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "lora_cpu.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--targets", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(asyncio.run(_worker(args))), flush=True)
        return

    from tunewire.models import ensure_default_base_model

    modes = [m for m in args.modes.split(",") if m]
    model = str(ensure_default_base_model(progress=print))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model, Path(tmp) / "adapter")
        plan = [(c, "-") for c in NO_LORA] + [(c, m) for c in CONFIGS if c not in NO_LORA
                                                for m in modes]
        runs: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.repeat):  # round-robin: drift in the machine hits every row
            for config, mode in plan:
                r = run_config(config, mode, model, adapter, args)
                runs.setdefault((config, mode), []).append(r)
                print(f"[{round_ + 1}/{args.repeat}] {config:12s} {mode:12s} {r['tok_s']:7.1f} "
                      f"tok/s  (engine start {r['start_s']:.0f} s)", flush=True)
        for (config, mode), rs in runs.items():
            r = sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2]  # the median run (upper)
            rows.append({"config": config, "mode": mode, **r,
                         "tok_s_runs": [round(x["tok_s"], 1) for x in rs]})

    ref, ref_eager = rows[0]["tok_s"], rows[1]["tok_s"]
    for r in rows:
        r["vs_base_nolora"] = r["tok_s"] / ref
        r["vs_base_nolora_eager"] = r["tok_s"] / ref_eager
    print("\n| workload | mode | tok/s | vs base, LoRA disabled | vs the same, eager |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['mode']} | {r['tok_s']:.1f} | {r['vs_base_nolora']:.2f} "
              f"| {r['vs_base_nolora_eager']:.2f} |")

    # Outputs unchanged: same token ids in every correct mode (upstream is wrong for `half`).
    mismatches = []
    for config in CONFIGS[2:]:
        ids = {r["mode"]: r["token_ids"] for r in rows
               if r["config"] == config and r["mode"] != "upstream"}
        if len({json.dumps(v) for v in ids.values()}) > 1:
            mismatches.append(config)
    print("token ids equal across modes:", "yes" if not mismatches else f"NO: {mismatches}")
    base_ids = {r["config"]: r["token_ids"] for r in rows if r["mode"] in ("-", modes[0])}
    if "base_lora" in base_ids:  # informational: LoRA off lets vLLM torch.compile the model
        print("base_lora == base_nolora token ids:",
              base_ids["base_lora"] == base_ids["base_nolora"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import vllm

    out.write_text(json.dumps({
        "workload": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "greedy": True,
                     "new_tokens": args.new_tokens, "concurrency": args.concurrency,
                     "requests": args.requests, "repeat": args.repeat,
                     "adapter": "r=16 q_proj,v_proj (random)",
                     "max_loras": 4, "vllm": vllm.__version__, "cpus": os.cpu_count()},
        "outputs_equal_across_modes": not mismatches,
        "results": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows],
    }, indent=2) + "\n")
    print("wrote", out)
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
