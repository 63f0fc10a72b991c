"""`tunewire` — one command line for both services and their clients.

    tunewire serve trainer|serving [--config FILE] [flags]     start a service (cli/serve.py)
    tunewire datasets upload FILE | validate ...               training data (cli/trainer.py)
    tunewire jobs create|get|list|watch|cancel|checkpoints|publish ...   training jobs
    tunewire adapters list|load|unload|pin|unpin|watch ...     adapters in serving (cli/serving.py)
    tunewire generate --prompt TEXT [--adapter A[@vN]] [--json-schema FILE | --regex R | --choice a,b]
    tunewire classify HEAD TEXT...                             feature-extraction heads
    tunewire model info | tokenize TEXT                        the served model
    tunewire loadtest --concurrency N | --rps R --duration S    load test (cli/loadtest.py)
    tunewire demo                                              the end-to-end demo (tunewire/demo.py)

Also `python -m tunewire.cli ...`. Clients talk to $TUNEWIRE_TRAINER (default 127.0.0.1:50051)
and $TUNEWIRE_SERVING (default 127.0.0.1:50052), or --trainer / --serving, with TLS and a token
when the services want them (cli/client.py). docs/operations.md has the full reference.
"""

from __future__ import annotations

import argparse

from tunewire.cli import client, loadtest, serve, serving, trainer


def cmd_demo(args) -> int:
    from tunewire.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunewire", description="Fine-tune LoRA adapters and serve them.")
    client.add_client_flags(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in (serve, trainer, serving, loadtest):
        module.add_parser(sub)
    d = sub.add_parser("demo", help="fine-tune SmolLM2 for JSON extraction and serve it")
    d.add_argument("--steps", type=int, default=0, help="training steps (0 = the demo default)")
    d.add_argument("--workdir", default="", help="where services keep state (default: a temp dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0
