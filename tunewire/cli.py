"""`tunewire` — one command line for both services and their clients.

    tunewire serve trainer|serving [--config FILE] [flags]     start a service
    tunewire jobs create|get|list|watch|cancel|checkpoints ... training jobs
    tunewire datasets upload FILE | validate ...               training data
    tunewire adapters list|load|unload|pin|unpin|watch ...     adapters in serving
    tunewire generate --prompt TEXT [--adapter A[@vN]] [--json-schema FILE | --regex R | --choice a,b]
    tunewire classify HEAD TEXT...                             feature-extraction heads
    tunewire loadtest --concurrency N | --rps R --duration S    load test (ghz-style report)
    tunewire model info | tokenize TEXT                        the served model
    tunewire demo                                              the end-to-end demo

Clients talk to $TUNEWIRE_TRAINER (default 127.0.0.1:50051) and $TUNEWIRE_SERVING
(default 127.0.0.1:50052), or --trainer / --serving. With TLS or a token on the services (README
"Security"): --tls-ca FILE [--tls-cert FILE --tls-key FILE] --token-file FILE, or
$TUNEWIRE_TLS_CA, $TUNEWIRE_TLS_CERT, $TUNEWIRE_TLS_KEY, $TUNEWIRE_TOKEN_FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict


def _client_errors(fn):
    def wrapped(args):
        try:
            return fn(args)
        except grpc.RpcError as e:
            from tunewire.status import error_info

            reason, fields = error_info(e)
            print(f"error: {e.code().name} {reason}: {e.details()}", file=sys.stderr)
            for f, d in fields.items():
                print(f"  {f}: {d}", file=sys.stderr)
            return 1
    return wrapped


def _print(msg) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def _channel(args, address: str) -> grpc.Channel:
    from tunewire.security import sync_channel

    return sync_channel(address, ca_file=args.client_tls_ca, cert_file=args.client_tls_cert,
                        key_file=args.client_tls_key, token_file=args.client_token_file)


def _trainer(args):
    from tunewire.trainer.v1 import trainer_pb2_grpc

    return trainer_pb2_grpc.TrainerServiceStub(_channel(args, args.trainer))


def _serving(args):
    from tunewire.serving.v1 import serving_pb2_grpc

    return serving_pb2_grpc.ServingServiceStub(_channel(args, args.serving))


# -- serve ------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "service", "config", "func",
                                                                   "trainer", "serving")
                 and not k.startswith("client_")}
    from tunewire.config import load_config

    if args.service == "trainer":
        from trainer_service.config import TrainerConfig
        from trainer_service.server import main

        return main(load_config(TrainerConfig, args.config, overrides))
    else:
        from serving_service.config import ServingConfig
        from serving_service.server import main

        return main(load_config(ServingConfig, args.config, overrides))


# -- jobs -------------------------------------------------------------------------------------
@_client_errors
def cmd_jobs(args) -> int:
    from tunewire.trainer.v1 import trainer_pb2 as pb

    stub = _trainer(args)
    if args.action == "create":
        bias = {"none": pb.LoraMethod.BIAS_NONE, "all": pb.LoraMethod.BIAS_ALL,
                "lora_only": pb.LoraMethod.BIAS_LORA_ONLY}[args.bias]
        lora = pb.LoraMethod(r=args.r, target_modules=[m for m in args.target_modules.split(",") if m],
                             lora_dropout=args.dropout, bias=bias, use_rslora=args.rslora,
                             use_dora=args.dora)
        if args.alpha is not None:
            lora.lora_alpha = args.alpha
        ev = pb.EvalSettings(eval_every_steps=args.eval_every,
                             early_stopping_min_delta=args.min_delta)
        if args.validation_fraction is not None:
            ev.validation_fraction = args.validation_fraction
        if args.patience is not None:
            ev.early_stopping_patience = args.patience
        method = {"lora": {"lora": lora}, "full": {"full": pb.FullMethod()},
                  "feature_extraction": {"feature_extraction": pb.FeatureExtractionMethod()}}[args.method]
        schema = open(args.json_schema).read() if args.json_schema else ""
        job = pb.TrainingJob(
            base_model=os.path.abspath(args.base_model), eval=ev, priority=args.priority,
            json_schema=schema, **method,
            validation_data=pb.DatasetRef(path=os.path.abspath(args.validation_data))
            if args.validation_data else None,
            training_data=pb.DatasetRef(path=os.path.abspath(args.data)), adapter_name=args.adapter_name,
            hyperparameters=pb.Hyperparameters(
                learning_rate=args.lr, num_epochs=args.epochs, max_steps=args.max_steps,
                batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                warmup_steps=args.warmup_steps, seed=args.seed, packing=args.packing))
        resp = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(training_job=job,
                                                                  request_id=args.request_id))
        if not args.watch:
            _print(resp.training_job)
            return 0
        print(f"created {resp.training_job.name}", file=sys.stderr)
        return watch(stub, resp.training_job.id)
    if args.action == "get":
        _print(stub.GetTrainingJob(pb.GetTrainingJobRequest(name=args.id)).training_job)
    elif args.action == "list":
        state = pb.TrainingJob.State.Value(f"STATE_{args.state.upper()}") if args.state else 0
        resp = stub.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=args.page_size, state=state,
                                                                page_token=args.page_token))
        for j in resp.training_jobs:
            print(f"{j.id}  {pb.TrainingJob.State.Name(j.state)[6:]:<11} {j.adapter_name:<20} "
                  f"step {j.progress.step}/{j.progress.total_steps}  loss {j.progress.loss:.4f}")
        if resp.next_page_token:
            print(f"next page: --page-token {resp.next_page_token}")
    elif args.action == "checkpoints":
        resp = stub.ListCheckpoints(pb.ListCheckpointsRequest(name=args.id))
        for c in resp.checkpoints:
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(c.metrics.items()) if k != "step")
            print(f"step {c.step:>6}  {metrics}  {'BEST ' if c.best else ''}{c.uri}")
    elif args.action == "publish":
        _print(stub.PublishCheckpoint(pb.PublishCheckpointRequest(name=args.id, step=args.step)).result)
    elif args.action == "cancel":
        _print(stub.CancelTrainingJob(pb.CancelTrainingJobRequest(name=args.id)).training_job)
    elif args.action == "watch":
        return watch(stub, args.id, args.after_seq)
    return 0


def watch(stub, job_id: str, after_seq: int = 0, console=None) -> int:
    """Follows a job with a live progress bar (loss, tokens/s); returns 0 if it succeeded."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tunewire.trainer.v1 import trainer_pb2 as pb

    console = console or Console(stderr=True, log_path=False)
    final = pb.TrainingJob.STATE_UNSPECIFIED
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("queued", total=None, loss="-", tps="-")
        for r in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(name=job_id, after_seq=after_seq)):
            kind = r.WhichOneof("payload")
            if kind == "metric":
                m = r.metric
                bar.update(task, description="training", total=m.total_steps, completed=m.step,
                           loss=f"{m.loss:.4f}", tps=f"{m.tokens_per_second:.0f}")
            elif kind == "state_change":
                final = r.state_change.state
                name = pb.TrainingJob.State.Name(final)[6:].lower()
                bar.update(task, description=name)
                msg = f"[{r.seq}] state {name}"
                if r.state_change.error.reason:
                    msg += f": {r.state_change.error.reason}: {r.state_change.error.message}"
                console.log(msg)
            else:
                console.log(f"[{r.seq}] {pb.JobEvent.Type.Name(r.event.type)[5:].lower()}: "
                            f"{r.event.message}")
    return 0 if final == pb.TrainingJob.STATE_SUCCEEDED else 1


# -- datasets ---------------------------------------------------------------------------------
@_client_errors
def cmd_datasets(args) -> int:
    from rich.progress import Progress

    from tunewire.trainer.v1 import trainer_pb2 as pb

    stub = _trainer(args)
    if args.action == "upload":
        size = os.path.getsize(args.file)
        with Progress(console=None, transient=True) as bar:
            task = bar.add_task(f"uploading {os.path.basename(args.file)}", total=size)

            def parts():
                yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(filename=os.path.basename(args.file)))
                with open(args.file, "rb") as f:
                    while chunk := f.read(1 << 20):
                        bar.advance(task, len(chunk))
                        yield pb.UploadDatasetRequest(chunk=chunk)

            _print(stub.UploadDataset(parts()))
        return 0
    report = stub.ValidateDataset(pb.ValidateDatasetRequest(
        base_model=os.path.abspath(args.base_model), training_data=pb.DatasetRef(path=args.data),
        validation_data=pb.DatasetRef(path=args.validation_data) if args.validation_data else None,
        max_seq_length=args.max_seq_length, batch_size=args.batch_size, max_steps=args.max_steps,
        measure_step_time=args.time)).report
    d = MessageToDict(report, preserving_proto_field_name=True)
    d.pop("details_json", None)
    print(json.dumps(d, indent=2))
    return 0 if report.ok else 1


# -- adapters and generation ------------------------------------------------------------------
@_client_errors
def cmd_adapters(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    stub = _serving(args)
    if args.action == "list":
        for a in stub.ListAdapters(pb.ListAdaptersRequest(include_store=args.all)).adapters:
            state = pb.Adapter.State.Name(a.state)[6:].lower()
            flags = "".join([" active" if a.active else "", " pinned" if a.pinned else ""])
            print(f"{a.name}@{a.version}  {state}{flags}  rank {a.rank}  {','.join(a.target_modules)}  "
                  f"requests {a.request_count}  load {a.load_ms:.0f} ms  {a.uri}")
    elif args.action == "load":
        _print(stub.LoadAdapter(pb.LoadAdapterRequest(name=args.name, version=args.version or "",
                                                       uri=args.uri or "", pin=args.pin)).adapter)
    elif args.action in ("pin", "unpin"):
        _print(stub.PinAdapter(pb.PinAdapterRequest(name=args.name, pinned=args.action == "pin")).adapter)
    elif args.action == "watch":
        for ev in stub.WatchAdapters(pb.WatchAdaptersRequest(name=args.name or "")):
            a = ev.adapter
            print(f"{a.name}@{a.version}  {pb.Adapter.State.Name(a.state)[6:].lower()}"
                  f"{'  active' if a.active else ''}  {a.failure_reason}", flush=True)
    else:
        stub.UnloadAdapter(pb.UnloadAdapterRequest(name=args.name))
        print(f"unloaded {args.name}")
    return 0


@_client_errors
def cmd_classify(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    r = _serving(args).Classify(pb.ClassifyRequest(head=args.head, texts=args.texts))
    for text, c in zip(args.texts, r.results):
        best = max(s.probability for s in c.scores)
        print(f"{c.label}\t{best:.3f}\t{text}")
    return 0


@_client_errors
def cmd_generate(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    fmt = pb.ResponseFormat(text=pb.TextFormat())
    if args.json_schema:
        with open(args.json_schema) as f:
            fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema=f.read(), strict=args.strict))
    elif args.json_object:
        fmt = pb.ResponseFormat(json_object=pb.JsonObjectFormat())
    elif args.regex:
        fmt = pb.ResponseFormat(regex=pb.RegexFormat(pattern=args.regex))
    elif args.choice:
        fmt = pb.ResponseFormat(choice=pb.ChoiceFormat(choices=args.choice.split(",")))
    sampling = pb.SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                                 temperature=args.temperature)
    common = dict(adapter=args.adapter, prompt=args.prompt, sampling=sampling, response_format=fmt,
                  time_limit_ms=args.time_limit_ms)
    stub = _serving(args)
    if args.stream:
        for r in stub.StreamGenerate(pb.StreamGenerateRequest(**common)):
            print(r.text, end="", flush=True)
        print()
        return 0
    _print(stub.Generate(pb.GenerateRequest(**common)))
    return 0


@_client_errors
def cmd_model(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    stub = _serving(args)
    if args.action == "info":
        _print(stub.GetModelInfo(pb.GetModelInfoRequest()))
    else:
        r = stub.Tokenize(pb.TokenizeRequest(adapter=args.adapter, text=args.text))
        for t in r.tokens:
            print(f"{t.id:>7}  [{t.start}:{t.end}]  {t.text!r}")
        print(f"{r.token_count} tokens")
    return 0


def cmd_demo(args) -> int:
    from tunewire.demo import run_demo

    return run_demo(args)


@_client_errors
def cmd_loadtest(args) -> int:
    import asyncio

    from tunewire import loadtest as lt

    kinds = lt.SERVING_KINDS if args.target == "serving" else lt.TRAINER_KINDS
    try:
        mix = lt.parse_mix(args.mix, kinds) if args.mix else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    secure = dict(ca_file=args.client_tls_ca, cert_file=args.client_tls_cert, key_file=args.client_tls_key,
                  token_file=args.client_token_file)
    try:
        report = asyncio.run(lt.run_load(
            args.trainer if args.target == "trainer" else args.serving, target=args.target,
            concurrency=args.concurrency, rps=args.rps, duration=args.duration, mix=mix,
            adapters=args.adapter, max_tokens=args.max_tokens, timeout=args.timeout, seed=args.seed,
            progress=not args.no_progress, channel_kwargs=secure, **kw))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunewire", description="Fine-tune LoRA adapters and serve them.")
    p.add_argument("--trainer", default=os.environ.get("TUNEWIRE_TRAINER", "127.0.0.1:50051"))
    p.add_argument("--serving", default=os.environ.get("TUNEWIRE_SERVING", "127.0.0.1:50052"))
    # client side of README "Security" (dest client_*: never mistaken for a serve setting)
    for flag, env, what in [("tls-ca", "TLS_CA", "CA of the services' TLS certificates"),
                            ("tls-cert", "TLS_CERT", "client certificate (mTLS)"),
                            ("tls-key", "TLS_KEY", "its private key"),
                            ("token-file", "TOKEN_FILE", "file with the bearer token")]:
        p.add_argument(f"--{flag}", dest="client_" + flag.replace("-", "_"),
                       default=os.environ.get(f"TUNEWIRE_{env}", ""), help=f"{what} [$TUNEWIRE_{env}]")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start a service")
    s.add_argument("service", choices=["trainer", "serving"])
    s.add_argument("--config", help="TOML file with settings (see configs/)")
    for flag, typ in [("host", str), ("port", int), ("metrics-port", int), ("adapter-store", str),
                      ("data-dir", str), ("data-root", str), ("model-root", str), ("serving-address", str), ("model", str),
                      ("max-concurrent-jobs", int), ("max-queued-jobs", int),
                      ("max-worker-retries", int), ("max-upload-bytes", int),
                      ("max-dataset-bytes", int), ("max-prompt-chars", int), ("max-message-bytes", int),
                      ("max-loras", int), ("max-lora-rank", int), ("max-cpu-loras", int),
                      ("max-model-len", int), ("drain-seconds", float), ("log-level", str),
                      ("max-concurrent-requests", int), ("max-queued-requests", int),
                      ("max-concurrent-per-adapter", int), ("schema-compile-timeout-s", float),
                      ("metrics-top-adapters", int), ("auth-token-file", str), ("tls-cert-file", str),
                      ("tls-key-file", str), ("tls-client-ca-file", str), ("health-port", int),
                      ("serving-tls-ca-file", str), ("serving-tls-cert-file", str),
                      ("serving-tls-key-file", str), ("serving-token-file", str)]:
        s.add_argument(f"--{flag}", type=typ, dest=flag.replace("-", "_"))
    s.add_argument("--enforce-eager", action="store_const", const=True, dest="enforce_eager")
    s.add_argument("--no-cpu-lora-compile", action="store_const", const=False, dest="cpu_lora_compile")
    s.add_argument("--lora-target-modules", dest="lora_target_modules", metavar="q_proj,v_proj,...",
                   type=lambda v: tuple(m for m in v.split(",") if m))
    s.add_argument("--no-lazy-load", action="store_const", const=False, dest="lazy_load")
    s.set_defaults(func=cmd_serve)

    j = sub.add_parser("jobs", help="training jobs")
    js = j.add_subparsers(dest="action", required=True)
    c = js.add_parser("create")
    c.add_argument("--base-model", required=True)
    c.add_argument("--data", required=True, help="JSONL: prompt/completion or messages")
    c.add_argument("--adapter-name", required=True)
    c.add_argument("--r", type=int, default=16)
    c.add_argument("--alpha", type=float, default=None)
    c.add_argument("--target-modules", default="q_proj,v_proj")
    c.add_argument("--dropout", type=float, default=0.05)
    c.add_argument("--bias", default="none", choices=["none", "all", "lora_only"])
    c.add_argument("--rslora", action="store_true")
    c.add_argument("--dora", action="store_true", help="DoRA (trains; vLLM cannot serve it)")
    c.add_argument("--method", default="lora", choices=["lora", "full", "feature_extraction"])
    c.add_argument("--json-schema", default="", help="file: JSON schema of completions (JSON evals)")
    c.add_argument("--lr", type=float, default=0.0)
    c.add_argument("--epochs", type=int, default=0)
    c.add_argument("--max-steps", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=0)
    c.add_argument("--max-seq-length", type=int, default=0)
    c.add_argument("--warmup-steps", type=int, default=0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--packing", action="store_true", help="pack examples into max-seq-length rows")
    c.add_argument("--request-id", default="")
    c.add_argument("--priority", type=int, default=0, help="higher runs first among queued jobs")
    c.add_argument("--validation-data", default="", help="JSONL of held-out examples")
    c.add_argument("--validation-fraction", type=float, default=None,
                   help="share of --data held out when --validation-data is not given")
    c.add_argument("--eval-every", type=int, default=0, help="evaluate + checkpoint every N steps")
    c.add_argument("--patience", type=int, default=None, help="early-stopping patience (0 = off)")
    c.add_argument("--min-delta", type=float, default=0.0)
    c.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    for name in ("get", "cancel", "watch", "checkpoints"):
        a = js.add_parser(name)
        a.add_argument("id")
        if name == "watch":
            a.add_argument("--after-seq", type=int, default=0)
    pc = js.add_parser("publish", help="publish one checkpoint of a finished job")
    pc.add_argument("id")
    pc.add_argument("--step", type=int, required=True)
    ls = js.add_parser("list")
    ls.add_argument("--state", default="")
    ls.add_argument("--page-size", type=int, default=50)
    ls.add_argument("--page-token", default="")
    j.set_defaults(func=cmd_jobs)

    ds = sub.add_parser("datasets", help="upload and check training data")
    dss = ds.add_subparsers(dest="action", required=True)
    up = dss.add_parser("upload", help="stream a file to the trainer's data root")
    up.add_argument("file")
    va = dss.add_parser("validate", help="the pre-flight report, without training")
    va.add_argument("--base-model", required=True)
    va.add_argument("--data", required=True, help="path under the trainer's data root")
    va.add_argument("--validation-data", default="")
    va.add_argument("--max-seq-length", type=int, default=0)
    va.add_argument("--batch-size", type=int, default=0)
    va.add_argument("--max-steps", type=int, default=0)
    va.add_argument("--time", action="store_true", help="time a warm-up step for an estimate")
    ds.set_defaults(func=cmd_datasets)

    a = sub.add_parser("adapters", help="adapters in serving")
    as_ = a.add_subparsers(dest="action", required=True)
    ls = as_.add_parser("list")
    ls.add_argument("--all", action="store_true", help="also versions only in the store")
    ld = as_.add_parser("load")
    ld.add_argument("name")
    ld.add_argument("--uri", default="", help="store directory (default: name/version in the store)")
    ld.add_argument("--version", default="", help="default: the newest in the store")
    ld.add_argument("--pin", action="store_true")
    for action in ("unload", "pin", "unpin"):
        as_.add_parser(action).add_argument("name", help="name or name@version")
    w = as_.add_parser("watch")
    w.add_argument("name", nargs="?", default="")
    a.set_defaults(func=cmd_adapters)

    cl = sub.add_parser("classify", help="classify texts with a feature-extraction head")
    cl.add_argument("head", help="name or name@version of a published head")
    cl.add_argument("texts", nargs="+")
    cl.set_defaults(func=cmd_classify)

    g = sub.add_parser("generate", help="generate with the base model or an adapter")
    g.add_argument("--prompt", required=True)
    g.add_argument("--adapter", default="")
    g.add_argument("--json-schema", help="file with a JSON schema to constrain the output")
    g.add_argument("--json-object", action="store_true")
    g.add_argument("--strict", action="store_true", help="with --json-schema: refuse unenforceable keywords")
    g.add_argument("--regex", default="", help="constrain the output to this regular expression")
    g.add_argument("--choice", default="", help="comma-separated strings; the output is one of them")
    g.add_argument("--time-limit-ms", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence or stop before this")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--stream", action="store_true")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("model", help="the served model: info, tokenize")
    ms = m.add_subparsers(dest="action", required=True)
    ms.add_parser("info")
    tk = ms.add_parser("tokenize")
    tk.add_argument("text")
    tk.add_argument("--adapter", default="")
    m.set_defaults(func=cmd_model)

    lt = sub.add_parser("loadtest", help="load-test serving (or the trainer's read RPCs); ghz-style report")
    lt.add_argument("--target", default="serving", choices=["serving", "trainer"])
    lt.add_argument("--concurrency", type=int, default=0,
                    help="closed loop: N requests in flight (with --rps: the most in flight)")
    lt.add_argument("--rps", type=float, default=0.0, help="open loop: this many requests per second")
    lt.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    lt.add_argument("--mix", default="", help="weights, e.g. base=2,adapter=1,json=1 (trainer: get=3,list=1)")
    lt.add_argument("--adapter", action="append", default=[], help="adapter for 'adapter' requests (repeatable)")
    lt.add_argument("--prompt", default="")
    lt.add_argument("--max-tokens", type=int, default=16)
    lt.add_argument("--json-schema", default="", help="file: schema of the 'json' requests (default: built in)")
    lt.add_argument("--regex", default="", help="constrain base/adapter outputs to this regex (long generations)")
    lt.add_argument("--timeout", type=float, default=60.0, help="deadline of each request, seconds")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--json", default="", help="also write the report to this file")
    lt.add_argument("--no-progress", action="store_true")
    lt.set_defaults(func=cmd_loadtest)

    d = sub.add_parser("demo", help="fine-tune SmolLM2 for JSON extraction and serve it")
    d.add_argument("--steps", type=int, default=0, help="training steps (0 = the demo default)")
    d.add_argument("--workdir", default="", help="where services keep state (default: a temp dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
