"""The report of bench/serving.py: a Markdown table per part on stdout (ready to paste into
docs/serving.md), docs/bench/serving_<part><suffix>.json and, with matplotlib, a PNG beside it.
"""

from __future__ import annotations

import json
import sys

import serving_schemas
from _common import OUT_DIR, bar_png, have_matplotlib, md_table, write_json
from serving_schemas import PERSON_SCHEMA

def report(args, results: dict, cond: dict) -> None:
    cmd = "python bench/serving.py " + " ".join(sys.argv[1:])
    common = {"command": cmd.strip(), "conditions": cond, "model": args.model,
              "max_tokens": args.max_tokens, "engine": {
                  "dtype": "float32", "enforce_eager": args.enforce_eager,
                  "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
                  "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs},
              "start_s": results.get("start_s", {})}
    plot_note = "" if have_matplotlib() else " (matplotlib not installed: no PNG)"

    def strip(r):
        return {k: v for k, v in r.items() if k != "extra"}

    if "overhead_inproc" in results and "overhead_grpc" in results:
        rows, data = [], []
        for c in args.conc:
            a, g = results["overhead_inproc"][str(c)], results["overhead_grpc"][str(c)]
            ratio = g["tok_s"] / a["tok_s"]
            d_ttft = g["ttft_ms_p50"] - a["ttft_ms_p50"]
            rows.append([c, a["requests"], f"{a['tok_s']:.1f}", f"{g['tok_s']:.1f}", f"{ratio:.3f}",
                         f"{a['ttft_ms_p50']:.1f}", f"{g['ttft_ms_p50']:.1f}", f"{d_ttft:+.1f}",
                         f"{a['latency_ms_p50']:.0f}", f"{g['latency_ms_p50']:.0f}"])
            data.append({"concurrency": c, "inproc": strip(a), "grpc": strip(g),
                         "throughput_ratio": ratio, "ttft_overhead_ms_p50": d_ttft,
                         "ttft_overhead_ms_p95": g["ttft_ms_p95"] - a["ttft_ms_p95"],
                         "tokens_equal": a["tokens"] == g["tokens"]})
        print("\n## Serving overhead: gRPC service vs the same AsyncLLM in-process\n")
        print(md_table(["concurrency", "requests", "in-process tok/s", "gRPC tok/s", "ratio",
                        "TTFT p50 in-proc ms", "TTFT p50 gRPC ms", "TTFT overhead ms",
                        "latency p50 in-proc ms", "latency p50 gRPC ms"], rows))
        print("tokens generated equal (in-proc vs gRPC):",
              ", ".join(f"c={d['concurrency']}: {d['tokens_equal']}" for d in data))
        write_json("serving_overhead" + args.suffix, {**common, "target_ratio": 0.95, "rows": data})
        bar_png("serving_overhead" + args.suffix, "gRPC service vs in-process AsyncLLM (tok/s)",
                [f"c={c}" for c in args.conc],
                {"in-process": [d["inproc"]["tok_s"] for d in data],
                 "gRPC": [d["grpc"]["tok_s"] for d in data]}, "tokens/s")

    if "adapters" in results:
        res = results["adapters"]
        base = res["base"]["tok_s"]
        rows = [[k, v["requests"], f"{v['tok_s']:.1f}", f"{v['tok_s'] / base:.2f}",
                 f"{v['ttft_ms_p50']:.0f}", f"{v['latency_ms_p50']:.0f}"] for k, v in res.items()]
        print(f"\n## Multi-adapter via gRPC (concurrency {max(args.conc)})\n")
        print(md_table(["workload", "requests", "tok/s", "vs base", "TTFT p50 ms", "latency p50 ms"], rows))
        write_json("serving_adapters" + args.suffix, {**common, "target_ratio": 0.8, "concurrency": max(args.conc),
                                        "rows": [{"workload": k, **strip(v), "vs_base": v["tok_s"] / base}
                                                 for k, v in res.items()]})
        bar_png("serving_adapters" + args.suffix, "Multi-adapter throughput vs base (gRPC)", list(res),
                {"vs base": [v["tok_s"] / base for v in res.values()]}, "ratio", ref_line=0.8)

    if "structured" in results:
        res = results["structured"]
        u = res["unconstrained"]
        rows = []
        for k, v in res.items():
            valid = sum(1 for e in v["extra"] if e["valid"]) if k != "unconstrained" else None
            parsed = sum(1 for e in v["extra"] if _parses(e["text"]))
            v["valid"], v["parses_as_json"] = valid, parsed
            rows.append([k, v["requests"], f"{v['tokens'] / v['requests']:.1f}", f"{v['tok_s']:.1f}",
                         f"{v['tok_s'] / u['tok_s']:.2f}", f"{v['req_s']:.2f}",
                         f"{v['req_s'] / u['req_s']:.2f}", f"{parsed}/{v['requests']}",
                         "-" if valid is None else f"{valid}/{v['requests']}"])
        print(f"\n## Structured output via gRPC (concurrency {max(args.conc)}, "
              f"max_tokens {args.json_max_tokens})\n")
        print(md_table(["mode", "requests", "tokens/request", "tok/s", "tok/s vs unconstrained",
                        "req/s", "req/s vs unconstrained", "parses as JSON", "schema-valid"], rows))
        write_json("serving_structured" + args.suffix, {**common, "json_max_tokens": args.json_max_tokens,
                                          "schema": PERSON_SCHEMA,
                                          "rows": [{"mode": k, **strip(v)} for k, v in res.items()]})
        bar_png("serving_structured" + args.suffix, "JSON-schema constrained vs unconstrained (gRPC)", list(res),
                {"tok/s": [v["tok_s"] for v in res.values()]}, "tokens/s")

    if "schemas" in results:
        serving_schemas.report(args, results["schemas"], common)

    if "hotload" in results:
        h = results["hotload"]
        rows = [[r["adapter"], f"{r['load_adapter_ms']:.0f}",
                 " / ".join(f"{r.get(k + '_ms', 0):.0f}" for k in ("validate", "room", "engine")),
                 f"{r['load_to_first_token_ms']:.0f}",
                 f"{r['first_request_ttft_ms']:.0f}", f"{r['base_ttft_under_load_ms']:.0f}",
                 r["served_version"]] for r in h["rows"]]
        print(f"\n## Hot-load via gRPC ({h['background_streams']} background streams of "
              f"{h['bg_tokens']} tokens running)\n")
        print(md_table(["adapter", "LoadAdapter ms", "validate / room / engine ms", "LoadAdapter call -> first token ms",
                        "of which first request TTFT ms", "base request TTFT ms (same load)",
                        "version served"], rows))
        write_json("serving_hotload" + args.suffix, {**common, **h})
        bar_png("serving_hotload" + args.suffix, "Hot-load under load (ms)", [r["adapter"] for r in h["rows"]],
                {"LoadAdapter": [r["load_adapter_ms"] for r in h["rows"]],
                 "call -> first token": [r["load_to_first_token_ms"] for r in h["rows"]],
                 "base TTFT": [r["base_ttft_under_load_ms"] for r in h["rows"]]}, "ms")
    print(f"\nJSON{plot_note} written to {OUT_DIR}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
