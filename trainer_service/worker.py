"""A training worker: one process per job, started by a launcher, never inside the server.

    python -m trainer_service.worker --job-id ID --job-dir DIR --report-address HOST:PORT
    (token in $TUNEWIRE_JOB_TOKEN)

It reads `DIR/spec.json`, runs the LoRA recipe, and pushes every state, metric and event to the
trainer's `TrainerWorkerService` (the same path a pod on another node would use). SIGTERM, or a
report answer saying the job is being cancelled, stops training at the next step.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import grpc

from trainer_service.spec import JobSpec
from tunewire.errors import JobFailure
from tunewire.logs import setup_logging
from tunewire.trainer.v1 import trainer_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tunewire.worker")


class GrpcReporter:
    """Implements recipe_lora.Reporter by calling TrainerWorkerService.ReportProgress."""

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

    def failed(self, reason: str, message: str, user_error: bool, retryable: bool) -> None:
        self._send(failed=worker_pb2.WorkerFailed(error=trainer_pb2.JobError(
            reason=reason, message=message, user_error=user_error, retryable=retryable)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--job-dir", required=True, type=Path)
    ap.add_argument("--report-address", required=True)
    args = ap.parse_args(argv)
    setup_logging()

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    reporter = GrpcReporter(args.report_address, args.job_id, os.environ.get("TUNEWIRE_JOB_TOKEN", ""))
    should_stop = lambda: stop["flag"] or reporter.cancel_requested  # noqa: E731

    from trainer_service import recipe_lora  # heavy (torch); after the cheap set-up above

    try:
        spec = JobSpec.from_json((args.job_dir / "spec.json").read_text())
        metrics = recipe_lora.run(spec, args.job_dir, reporter, should_stop)
    except recipe_lora.Cancelled:
        log.info("cancelled", extra={"job": args.job_id})
        return 0
    except JobFailure as e:
        reporter.failed(e.reason, e.message, e.user_error, e.retryable)
        return 1
    except Exception as e:  # noqa: BLE001 - reported as a system error, details in worker.log
        traceback.print_exc()
        reporter.failed("TRAINING_ERROR", f"{type(e).__name__}: {e}", False, False)
        return 1
    reporter.finished(args.job_dir / "adapter", metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
