"""`tunewire jobs ...` and `tunewire datasets ...`: the trainer's client commands.

    tunewire datasets upload train.jsonl                      # prints {"path": "uploads/<sha256>.jsonl", ...}
    tunewire datasets validate --base-model M --data uploads/<sha256>.jsonl
    tunewire jobs create --base-model M --data uploads/<sha256>.jsonl --adapter-name NAME [--watch]
    tunewire jobs list|get|watch|cancel|checkpoints|publish ...

Paths name files on the trainer, not on this machine, and go to it exactly as given: `--data`
and `--validation-data` absolute or relative to the trainer's `data_root`, `--base-model`
absolute or relative to its `model_root`. So the path `datasets upload` prints is the path
`datasets validate` and `jobs create` take. (`--json-schema` is read here and sent as text.)
"""

from __future__ import annotations

import json
import os
import sys

from google.protobuf.json_format import MessageToDict

from tunewire.cli.client import print_message, rpc_errors, trainer_stub
from tunewire.job_watch import watch_job

ON_TRAINER = "on the trainer: absolute or relative to its data_root (what `datasets upload` prints)"


@rpc_errors
def cmd_jobs(args) -> int:
    from tunewire.trainer.v1 import trainer_pb2 as pb

    stub = trainer_stub(args)
    if args.action == "create":
        job = _job(args)
        resp = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(training_job=job, request_id=args.request_id))
        if not args.watch:
            print_message(resp.training_job)
            return 0
        print(f"created {resp.training_job.name}", file=sys.stderr)
        return watch_job(stub, resp.training_job.id)
    if args.action == "get":
        print_message(stub.GetTrainingJob(pb.GetTrainingJobRequest(name=args.id)).training_job)
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
        for c in stub.ListCheckpoints(pb.ListCheckpointsRequest(name=args.id)).checkpoints:
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(c.metrics.items()) if k != "step")
            print(f"step {c.step:>6}  {metrics}  {'BEST ' if c.best else ''}{c.uri}")
    elif args.action == "publish":
        print_message(stub.PublishCheckpoint(pb.PublishCheckpointRequest(name=args.id, step=args.step)).result)
    elif args.action == "cancel":
        print_message(stub.CancelTrainingJob(pb.CancelTrainingJobRequest(name=args.id)).training_job)
    elif args.action == "watch":
        return watch_job(stub, args.id, args.after_seq)
    return 0


def _job(args):
    """The TrainingJob of `jobs create`'s flags; unset flags stay 0 (the trainer's defaults)."""
    from tunewire.trainer.v1 import trainer_pb2 as pb

    bias = {"none": pb.LoraMethod.BIAS_NONE, "all": pb.LoraMethod.BIAS_ALL,
            "lora_only": pb.LoraMethod.BIAS_LORA_ONLY}[args.bias]
    lora = pb.LoraMethod(r=args.r, target_modules=[m for m in args.target_modules.split(",") if m],
                         lora_dropout=args.dropout, bias=bias, use_rslora=args.rslora, use_dora=args.dora)
    if args.alpha is not None:
        lora.lora_alpha = args.alpha
    ev = pb.EvalSettings(eval_every_steps=args.eval_every, early_stopping_min_delta=args.min_delta)
    if args.validation_fraction is not None:
        ev.validation_fraction = args.validation_fraction
    if args.patience is not None:
        ev.early_stopping_patience = args.patience
    method = {"lora": {"lora": lora}, "full": {"full": pb.FullMethod()},
              "feature_extraction": {"feature_extraction": pb.FeatureExtractionMethod()}}[args.method]
    schema = ""
    if args.json_schema:
        with open(args.json_schema) as f:
            schema = f.read()
    return pb.TrainingJob(
        base_model=args.base_model, adapter_name=args.adapter_name, eval=ev, priority=args.priority,
        json_schema=schema, training_data=pb.DatasetRef(path=args.data), publish_only=args.publish_only,
        validation_data=pb.DatasetRef(path=args.validation_data) if args.validation_data else None,
        hyperparameters=pb.Hyperparameters(
            learning_rate=args.lr, num_epochs=args.epochs, max_steps=args.max_steps,
            batch_size=args.batch_size, max_seq_length=args.max_seq_length,
            warmup_steps=args.warmup_steps, seed=args.seed, packing=args.packing,
            max_grad_norm=args.max_grad_norm, precision=f"PRECISION_{args.precision.upper()}"
            if args.precision != "auto" else "PRECISION_UNSPECIFIED",
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_accumulation_steps=args.grad_accum,
            quantization=f"QUANTIZATION_{args.quantization.upper()}"), **method)


@rpc_errors
def cmd_datasets(args) -> int:
    from rich.progress import Progress

    from tunewire.trainer.v1 import trainer_pb2 as pb

    stub = trainer_stub(args)
    if args.action == "upload":
        name = os.path.basename(args.file)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"uploading {name}", total=os.path.getsize(args.file))

            def parts():
                yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(filename=name))
                with open(args.file, "rb") as f:
                    while chunk := f.read(1 << 20):
                        bar.advance(task, len(chunk))
                        yield pb.UploadDatasetRequest(chunk=chunk)

            print_message(stub.UploadDataset(parts()))
        return 0
    report = stub.ValidateDataset(pb.ValidateDatasetRequest(
        base_model=args.base_model, training_data=pb.DatasetRef(path=args.data),
        validation_data=pb.DatasetRef(path=args.validation_data) if args.validation_data else None,
        max_seq_length=args.max_seq_length, batch_size=args.batch_size, max_steps=args.max_steps,
        measure_step_time=args.time)).report
    d = MessageToDict(report, preserving_proto_field_name=True)
    details = json.loads(d.pop("details_json", "") or "{}")
    # The lines max_seq_length cuts or drops are only in the details: name them too.
    for key in ("truncated_lines", "dropped_lines"):
        if details.get(key):
            d[key] = details[key]
            if details.get(f"{key}_unlisted"):
                d[f"{key}_unlisted"] = details[f"{key}_unlisted"]
    print(json.dumps(d, indent=2))
    return 0 if report.ok else 1


def add_parser(sub) -> None:
    j = sub.add_parser("jobs", help="training jobs")
    js = j.add_subparsers(dest="action", required=True)
    c = js.add_parser("create", help="create a training job", description=__doc__.split("\n\n")[2])
    _data_flags(c)
    c.add_argument("--adapter-name", required=True)
    c.add_argument("--method", default="lora", choices=["lora", "full", "feature_extraction"])
    c.add_argument("--r", type=int, default=16)
    c.add_argument("--alpha", type=float, default=None)
    c.add_argument("--target-modules", default="q_proj,v_proj")
    c.add_argument("--dropout", type=float, default=0.05)
    c.add_argument("--bias", default="none", choices=["none", "all", "lora_only"])
    c.add_argument("--rslora", action="store_true")
    c.add_argument("--dora", action="store_true", help="DoRA (vLLM cannot serve it: with --publish-only)")
    c.add_argument("--publish-only", action="store_true",
                   help="publish to the adapter store only: no handoff to serving, so the job is not "
                        "checked against what serving can load (rank, targets, DoRA, bias)")
    c.add_argument("--json-schema", default="", help="local file: JSON schema of completions (JSON evals)")
    for name, typ in [("lr", float), ("epochs", int), ("warmup-steps", int), ("seed", int)]:
        c.add_argument(f"--{name}", type=typ, default=0, help="0 = the trainer's default")
    c.add_argument("--packing", action="store_true", help="pack examples into max-seq-length rows")
    c.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (0 = off; unset = 1.0)")
    c.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on a GPU that has it, fp32 on a CPU")
    c.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% more compute")
    c.add_argument("--grad-accum", type=int, default=0, help="micro-batches per optimizer step (0 = 1)")
    c.add_argument("--quantization", default="none", choices=["none", "nf4"], help="nf4 = QLoRA (CUDA)")
    c.add_argument("--request-id", default="", help="idempotency key: the same key returns the same job")
    c.add_argument("--priority", type=int, default=0, help="higher runs first among queued jobs")
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
    ls.add_argument("--state", default="", help="e.g. running, succeeded")
    ls.add_argument("--page-size", type=int, default=50)
    ls.add_argument("--page-token", default="")
    j.set_defaults(func=cmd_jobs)

    ds = sub.add_parser("datasets", help="upload and check training data")
    dss = ds.add_subparsers(dest="action", required=True)
    dss.add_parser("upload", help="stream a local file to the trainer's data_root/uploads/").add_argument("file")
    va = dss.add_parser("validate", help="the pre-flight report, without training")
    _data_flags(va)
    va.add_argument("--time", action="store_true", help="time a warm-up step for an estimate")
    ds.set_defaults(func=cmd_datasets)


def _data_flags(p) -> None:
    """What `jobs create` and `datasets validate` both take, with the same meaning."""
    p.add_argument("--base-model", required=True,
                   help="model directory on the trainer: absolute or relative to its model_root")
    p.add_argument("--data", required=True, help=f"training data {ON_TRAINER}")
    p.add_argument("--validation-data", default="", help=f"held-out data {ON_TRAINER}")
    for name in ("max-seq-length", "batch-size", "max-steps"):
        p.add_argument(f"--{name}", type=int, default=0, help="0 = the trainer's default")
