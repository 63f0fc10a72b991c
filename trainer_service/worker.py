"""A training worker: one process per job, started by a launcher, never inside the server.

    python -m trainer_service.worker --job-id ID --job-dir DIR --report-address HOST:PORT
    (token in $TUNEWIRE_JOB_TOKEN)

It reads `DIR/spec.json` and `DIR/worker.json` ({"device": "auto"|"cpu"|"cuda", "serving": bool},
written by the scheduler), checks the data (the pre-flight report, a VALIDATED event; a dataset
with errors fails the job before any model is loaded), estimates the job's GPU memory
(trainer_service/memory.py: in the VALIDATED event on every device; on a GPU a job that cannot fit
fails as INSUFFICIENT_GPU_MEMORY before any model is loaded), runs the job's method (recipe_lora,
recipe_full or recipe_classifier) on the device, and pushes every state, metric and event to the trainer's
`TrainerWorkerService` (the same path a pod on another node would use). SIGTERM, or a report
answer saying the job is being cancelled, stops training at the next step.

With `num_processes` > 1 the launcher starts it under torchrun, once per rank (WORLD_SIZE > 1):
each rank joins the process group, only rank 0 reports (the others get a `NullReporter`), and
the recipe keeps the ranks in step (see distributed.py). Any rank failing exits non-zero, and
torchrun then stops the others and exits non-zero itself. A rank that finds a peer gone exits
without a failure report, like a crash, so the job is retried from its last checkpoint.

A CUDA out-of-memory error that escapes the recipe (at model load, say; the recipes map the ones
inside their steps) fails the job as the user error OUT_OF_MEMORY with the peak and the same
advice as the refusal, never as TRAINING_ERROR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import grpc

from trainer_service import memory
from trainer_service.spec import JobSpec
from tunewire import chat, devices, loading
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.logs import setup_logging
from tunewire.trainer.v1 import trainer_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tunewire.worker")


class GrpcReporter:
    """Implements loop.Reporter by calling TrainerWorkerService.ReportProgress."""

    def __init__(self, address: str, job_id: str, token: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = worker_pb2_grpc.TrainerWorkerServiceStub(self.channel)
        self.job_id = job_id
        self.metadata = (("x-tunewire-job-token", token),)
        self.cancel_requested = False

    def _send(self, **report) -> None:
        req = worker_pb2.ReportProgressRequest(job_id=self.job_id, **report)
        # Retries ride out a brief server hiccup; a server that stays away ends the worker.
        resp = self.stub.ReportProgress(req, metadata=self.metadata, timeout=60,
                                        wait_for_ready=True)
        self.cancel_requested |= resp.cancel_requested

    def started(self, trainable_params: int, total_params: int, total_steps: int) -> None:
        self._send(started=worker_pb2.WorkerStarted(
            trainable_params=trainable_params, total_params=total_params,
            total_steps=total_steps, pid=os.getpid()))

    def event(self, kind: str, message: str, data: dict[str, str],
              metrics: dict[str, float] | None = None) -> None:
        self._send(event=trainer_pb2.JobEvent(type=trainer_pb2.JobEvent.Type.Value(f"TYPE_{kind}"),
                                              message=message, data=data, metrics=metrics or {}))

    def evaluation(self, *, step: int, metrics: dict[str, float]) -> None:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")
        self.event("EVAL_COMPLETED", f"step {step}: {summary}", {}, {**metrics, "step": float(step)})

    def metric(self, **point) -> None:
        self._send(metric=trainer_pb2.MetricPoint(**point))

    def finished(self, adapter_dir: Path, metrics: dict[str, float]) -> None:
        self._send(finished=worker_pb2.WorkerFinished(adapter_dir=str(adapter_dir), metrics=metrics))

    def failed(self, error: dict) -> None:
        self._send(failed=worker_pb2.WorkerFailed(error=trainer_pb2.JobError(**error)))


class NullReporter:
    """The reporter of ranks other than 0 under DDP: rank 0 reports for all."""

    cancel_requested = False

    def started(self, *args, **kwargs) -> None: ...
    def event(self, *args, **kwargs) -> None: ...
    def evaluation(self, **kwargs) -> None: ...
    def metric(self, **kwargs) -> None: ...
    def finished(self, *args) -> None: ...
    def failed(self, *args) -> None: ...


def worker_settings(job_dir: Path) -> dict:
    """The scheduler's worker.json ({} when absent: device auto, no serving)."""
    path = job_dir / "worker.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def memory_estimate(spec: JobSpec, device) -> memory.MemoryEstimate | None:
    """The job's GPU memory estimate at the precision it trains in on `device` (None for
    feature extraction: its frozen body keeps no activations for backward). On a GPU a job that
    cannot fit is refused here (INSUFFICIENT_GPU_MEMORY); on a CPU it is a forecast for a GPU."""
    if spec.method == "feature_extraction":
        return None
    precision = devices.precision_name(devices.resolve_precision(spec.hyperparameters.precision, device))
    if device.type != "cuda" and spec.hyperparameters.precision == "auto":
        precision = memory.job_precision(spec)  # the forecast is for a GPU: auto = bf16 there
    total = devices.total_memory_bytes(device)
    est = memory.estimate(spec, precision=precision, device_total_bytes=total)
    memory.check_fits(est, spec, total)
    return est


def out_of_memory(spec: JobSpec | None, device, e: BaseException) -> TunewireError:
    """The job's error for a CUDA out-of-memory: the peak, the GPU's size and the advice."""
    peak, total = devices.peak_memory_bytes(device), devices.total_memory_bytes(device)
    tips = memory.advice(spec) if spec is not None else "use a GPU with more memory"
    return TunewireError(R.OUT_OF_MEMORY, f"CUDA out of memory (peak {peak / memory.GIB:.1f} GiB "
                         f"of {total / memory.GIB:.1f} GiB): {tips}")


def preflight(spec: JobSpec, reporter, device=None) -> None:
    """The dataset report before any training: a dataset with errors fails the job as user_error.
    Then the memory estimate (see memory_estimate), reported in the same VALIDATED event."""
    from trainer_service.preflight import validate_dataset

    tokenizer = loading.load_tokenizer(spec.base_model)
    hp = spec.hyperparameters
    report = validate_dataset(spec.training_data, tokenizer, hp.max_seq_length,
                              validation_path=spec.validation_data or None,
                              eos_ids=loading.stop_ids(spec.base_model, tokenizer), batch_size=hp.batch_size,
                              num_epochs=hp.num_epochs, max_steps=hp.max_steps)
    if not report.ok:
        shown = "; ".join(e.describe(report.unit) for e in report.errors[:5])
        more = f" (and {report.error_count - 5} more)" if report.error_count > 5 else ""
        raise TunewireError(R.DATASET_INVALID, f"{report.error_count} problem(s) in the data: {shown}{more}")
    numbers = {"examples": report.num_examples, "validation_examples": report.num_validation_examples,
               "truncated": report.truncated, "duplicates": report.duplicates.count,
               "leakage": report.leakage.exact.count, "steps": report.fit.steps}
    if report.coverage_mean is not None:
        numbers.update(coverage_mean=report.coverage_mean, eos_untrained=report.eos_untrained)
    data = {"report": json.dumps(report.to_dict())}
    est = memory_estimate(spec, device) if device is not None else None
    if est is not None:
        data["memory"] = json.dumps(est.to_dict())
        numbers.update(estimated_gpu_memory_bytes=est.total_bytes,
                       estimated_gpu_memory_bytes_checkpointed=est.total_bytes_checkpointed)
    reporter.event("VALIDATED", f"{report.num_examples} {report.format} examples, "
                   f"{report.truncated} truncated, {report.duplicates.count} duplicates, "
                   f"{report.leakage.exact.count} leaked into validation",
                   data, {k: float(v) for k, v in numbers.items()})


def train(spec: JobSpec, job_dir: Path, reporter, should_stop,
          device: str = "auto") -> tuple[dict[str, float], Path]:
    """Runs the job's method on `device` (the worker.json setting); returns its metrics and the
    artifact directory to publish."""
    if spec.method == "full":
        from trainer_service import recipe_full

        return recipe_full.run(spec, job_dir, reporter, should_stop, device=device), job_dir / "model"
    if spec.method == "feature_extraction":
        from trainer_service import recipe_classifier as rc

        hp, ev = spec.hyperparameters, spec.eval
        settings = rc.ClassifierSettings(
            base_model=spec.base_model, training_data=spec.training_data,
            validation_data=spec.validation_data or None,
            validation_fraction=ev.validation_fraction or 0.1, pooling=spec.pooling,
            learning_rate=hp.learning_rate, num_epochs=hp.num_epochs, max_steps=hp.max_steps,
            batch_size=hp.batch_size, max_seq_length=hp.max_seq_length,
            eval_every=ev.eval_every_steps, seed=hp.seed)
        return rc.run(settings, job_dir, reporter, should_stop, device=device), job_dir / "classifier"
    from trainer_service import recipe_lora

    return recipe_lora.run(spec, job_dir, reporter, should_stop, device=device), job_dir / "adapter"


def json_eval_in_process(spec: JobSpec, job_dir: Path, reporter, limit: int = 20,
                         device=None) -> dict[str, float]:
    """JSON evals when no serving endpoint is configured: HF greedy generation of the base model
    and of the trained adapter on the first `limit` validation rows (slower than serving), on
    `device` (default the CPU) in the job's precision there."""
    import torch
    from peft import PeftModel

    from trainer_service import publisher

    try:
        cases = publisher.json_cases(spec.validation_data, limit)
    except (ValueError, KeyError, TunewireError) as e:  # references that are not JSON: nothing to score
        reporter.event("EVAL_COMPLETED", f"JSON eval skipped: {e}", {})
        return {}
    tokenizer = loading.load_tokenizer(spec.base_model)
    stop = list(loading.stop_ids(spec.base_model, tokenizer))
    device = device if device is not None else torch.device("cpu")
    dtype = devices.resolve_precision(spec.hyperparameters.precision, device)

    def answers(model) -> list[str]:
        out = []
        for prompt, messages, _ in cases:
            text = prompt or chat.render_prompt(tokenizer, messages)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=bool(prompt)).input_ids.to(device)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=256,
                                     do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    model = loading.load_causal_lm(spec.base_model, dtype=dtype, device=device).eval()
    base = answers(model)
    tuned = answers(PeftModel.from_pretrained(model, job_dir / "adapter").eval())
    metrics = publisher.score_cases(tuned, base, cases, json.loads(spec.json_schema))
    reporter.event("EVAL_COMPLETED", publisher.describe(metrics, len(cases), "in the worker, HF generate"),
                   {}, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--job-dir", required=True, type=Path)
    ap.add_argument("--report-address", required=True)
    args = ap.parse_args(argv)
    setup_logging()

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    from trainer_service import distributed, loop  # heavy (torch); after the cheap set-up

    distributed.init()  # under torchrun: select this rank's GPU, join the other ranks (first thing)
    rank = distributed.rank()
    reporter = (GrpcReporter(args.report_address, args.job_id, os.environ.get("TUNEWIRE_JOB_TOKEN", ""))
                if rank == 0 else NullReporter())
    should_stop = lambda: stop["flag"] or reporter.cancel_requested  # noqa: E731
    spec, device = None, None
    try:
        settings = worker_settings(args.job_dir)
        device_setting = settings.get("device", "auto")
        device = devices.resolve_device(device_setting)
        spec = JobSpec.from_json((args.job_dir / "spec.json").read_text())
        if rank == 0:
            preflight(spec, reporter, device)
        metrics, artifact = train(spec, args.job_dir, reporter, should_stop, device_setting)
        if (spec.method == "lora" and spec.json_schema and spec.validation_data
                and not settings.get("serving", False) and distributed.rank() == 0):
            metrics = {**metrics, **json_eval_in_process(spec, args.job_dir, reporter, device=device)}
    except loop.Cancelled:
        log.info("cancelled", extra={"job": args.job_id, "rank": rank})
        return 0
    except TunewireError as e:  # bad input, or training that cannot go on: the job's error
        reporter.failed(e.job_error())
        return 1
    except distributed.PeerLost as e:  # no report: the job is retried like after a crash
        log.error("another rank is gone: %s", e, extra={"job": args.job_id, "rank": rank})
        return 1
    except Exception as e:  # noqa: BLE001 - reported as a system error, details in worker.log
        traceback.print_exc()
        if _is_cuda_oom(e) and device is not None:  # the user's job is too big: a user error
            reporter.failed(out_of_memory(spec, device, e).job_error())
            return 1
        reporter.failed(TunewireError(R.TRAINING_ERROR, f"{type(e).__name__}: {e}").job_error())
        return 1
    finally:
        distributed.destroy()
    reporter.finished(artifact, metrics)
    return 0


def _is_cuda_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError)


if __name__ == "__main__":
    sys.exit(main())
