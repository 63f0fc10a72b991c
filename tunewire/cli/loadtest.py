"""`tunewire loadtest`: the command line of tunewire/loadtest.py (which explains the load and
the report).

    tunewire loadtest --concurrency 8 --duration 30 --mix base=2,adapter=1,json=1 --adapter extract
    tunewire loadtest --rps 20 --duration 10 --max-tokens 16 --json report.json
    tunewire loadtest --target trainer --concurrency 16 --duration 10 --mix get=3,list=1

Exit status 0 when any request succeeded (refusals past capacity are part of a report), 1 when
none did, 2 for bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import sys

from tunewire import loadtest as lt
from tunewire.cli.client import channel_kwargs, rpc_errors


@rpc_errors
def cmd_loadtest(args) -> int:
    kw = {}
    if args.target == "serving":
        from tunewire.serving.v1 import serving_pb2 as pb

        if args.regex:
            kw["response_format"] = pb.ResponseFormat(regex=pb.RegexFormat(pattern=args.regex))
        if args.json_schema:
            with open(args.json_schema) as f:
                kw["json_schema"] = f.read()
        if args.prompt:
            kw["prompt"] = args.prompt
    try:
        mix = lt.parse_mix(args.mix, lt.SERVING_KINDS if args.target == "serving" else lt.TRAINER_KINDS) \
            if args.mix else None
        report = asyncio.run(lt.run_load(
            args.trainer if args.target == "trainer" else args.serving, target=args.target,
            concurrency=args.concurrency, rps=args.rps, duration=args.duration, mix=mix,
            adapters=args.adapter, max_tokens=args.max_tokens, timeout=args.timeout, seed=args.seed,
            progress=not args.no_progress, channel_kwargs=channel_kwargs(args), **kw))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="load-test serving (or the trainer's read RPCs); ghz-style report")
    p.add_argument("--target", default="serving", choices=["serving", "trainer"])
    p.add_argument("--concurrency", type=int, default=0,
                   help="closed loop: N requests in flight (with --rps: the most in flight)")
    p.add_argument("--rps", type=float, default=0.0, help="open loop: this many requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    p.add_argument("--mix", default="", help="weights, e.g. base=2,adapter=1,json=1 (trainer: get=3,list=1)")
    p.add_argument("--adapter", action="append", default=[], help="adapter for 'adapter' requests (repeatable)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json-schema", default="", help="file: schema of the 'json' requests (default: built in)")
    p.add_argument("--regex", default="", help="constrain base/adapter outputs to this regex (long generations)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the report to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_loadtest)
