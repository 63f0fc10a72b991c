"""gRPC servicers of the trainer: proto ⇄ domain mapping, nothing more. TrainerService calls
`JobService` (jobs.py); TrainerWorkerService, the workers' reports, calls its `Scheduler`.

Domain errors raised here or below become gRPC statuses in `tunewire.grpc_util`'s interceptor.
"""

from __future__ import annotations

import asyncio
import json

from trainer_service.jobs import JobService
from trainer_service.scheduler import Scheduler
from trainer_service.spec import EvalSpec, Hyperparameters, JobSpec, LoraSpec
from trainer_service.store import Entry, Job
from tunewire import reasons as R
from tunewire.errors import TunewireError, invalid
from tunewire.grpc_util import timestamp
from tunewire.trainer.v1 import trainer_pb2 as pb
from tunewire.trainer.v1 import trainer_pb2_grpc, worker_pb2, worker_pb2_grpc

_BIAS = {pb.LoraMethod.BIAS_UNSPECIFIED: "none", pb.LoraMethod.BIAS_NONE: "none",
         pb.LoraMethod.BIAS_ALL: "all", pb.LoraMethod.BIAS_LORA_ONLY: "lora_only"}
_POOLING = {pb.FeatureExtractionMethod.POOLING_UNSPECIFIED: "mean",
            pb.FeatureExtractionMethod.POOLING_MEAN: "mean", pb.FeatureExtractionMethod.POOLING_LAST: "last"}

_PRECISION = {pb.PRECISION_UNSPECIFIED: "auto", pb.PRECISION_FP32: "fp32", pb.PRECISION_BF16: "bf16",
              pb.PRECISION_FP16: "fp16"}
_QUANTIZATION = {pb.QUANTIZATION_UNSPECIFIED: "none", pb.QUANTIZATION_NONE: "none",
                 pb.QUANTIZATION_NF4: "nf4"}


def _inverse(mapping: dict) -> dict:
    """spec value -> proto enum; the first (lowest) enum wins, so "none"/"auto" go back as the
    enum a client would send."""
    out: dict = {}
    for k, v in mapping.items():
        out.setdefault(v, k)
    return out


def _enum(mapping: dict, value: int, field: str):
    """A proto enum's spec value; proto3 enums are open, so an unknown number is INVALID_ARGUMENT."""
    if value not in mapping:
        raise invalid(field, f"unknown value {value}")
    return mapping[value]


def spec_from_proto(job: pb.TrainingJob) -> JobSpec:
    method = job.WhichOneof("method")
    if method is None:
        raise invalid("training_job.method", "a method is required: lora, full or feature_extraction")
    m, h = job.lora, job.hyperparameters
    lora = LoraSpec(r=m.r or 8, lora_alpha=m.lora_alpha if m.HasField("lora_alpha") else None,
                    target_modules=tuple(m.target_modules), lora_dropout=m.lora_dropout,
                    bias=_enum(_BIAS, m.bias, "training_job.lora.bias"), use_rslora=m.use_rslora,
                    use_dora=m.use_dora)
    d = Hyperparameters()
    hp = Hyperparameters(
        learning_rate=h.learning_rate or d.learning_rate, num_epochs=h.num_epochs or d.num_epochs,
        max_steps=h.max_steps, batch_size=h.batch_size or d.batch_size,
        max_seq_length=h.max_seq_length or d.max_seq_length, warmup_steps=h.warmup_steps,
        weight_decay=h.weight_decay, seed=h.seed,
        # unset: the default; 0 is a value (no clipping), not "unset"
        max_grad_norm=h.max_grad_norm if h.HasField("max_grad_norm") else d.max_grad_norm,
        num_processes=h.num_processes or 1, packing=h.packing, num_nodes=h.num_nodes or 1,
        precision=_enum(_PRECISION, h.precision, "training_job.hyperparameters.precision"),
        gradient_checkpointing=h.gradient_checkpointing,
        gradient_accumulation_steps=h.gradient_accumulation_steps or 1,
        quantization=_enum(_QUANTIZATION, h.quantization,
                           "training_job.hyperparameters.quantization"))
    e = job.eval
    ev = EvalSpec(
        validation_fraction=e.validation_fraction if e.HasField("validation_fraction") else None,
        eval_every_steps=e.eval_every_steps,
        early_stopping_patience=(e.early_stopping_patience if e.HasField("early_stopping_patience")
                                 else EvalSpec().early_stopping_patience),
        early_stopping_min_delta=e.early_stopping_min_delta)
    return JobSpec(base_model=job.base_model, training_data=job.training_data.path,
                   adapter_name=job.adapter_name, lora=lora, hyperparameters=hp,
                   validation_data=job.validation_data.path, eval=ev, priority=job.priority,
                   method=method, pooling=_enum(_POOLING, job.feature_extraction.pooling,
                                                "training_job.feature_extraction.pooling"),
                   json_schema=job.json_schema, publish_only=job.publish_only)


def job_to_proto(job: Job) -> pb.TrainingJob:
    spec = JobSpec.from_json(job.spec)
    inv_bias = {"none": pb.LoraMethod.BIAS_NONE, "all": pb.LoraMethod.BIAS_ALL,
                "lora_only": pb.LoraMethod.BIAS_LORA_ONLY}
    h = spec.hyperparameters
    out = pb.TrainingJob(
        name=f"trainingJobs/{job.id}", id=job.id, base_model=spec.base_model,
        training_data=pb.DatasetRef(path=spec.training_data),
        hyperparameters=pb.Hyperparameters(
            learning_rate=h.learning_rate, num_epochs=h.num_epochs, max_steps=h.max_steps,
            batch_size=h.batch_size, max_seq_length=h.max_seq_length, warmup_steps=h.warmup_steps,
            weight_decay=h.weight_decay, max_grad_norm=h.max_grad_norm, seed=h.seed,
            num_processes=h.num_processes, packing=h.packing, num_nodes=h.num_nodes,
            precision=_inverse(_PRECISION)[h.precision], gradient_checkpointing=h.gradient_checkpointing,
            gradient_accumulation_steps=h.gradient_accumulation_steps,
            quantization=_inverse(_QUANTIZATION)[h.quantization]),
        json_schema=spec.json_schema, publish_only=spec.publish_only,
        validation_data=pb.DatasetRef(path=spec.validation_data) if spec.validation_data else None,
        eval=pb.EvalSettings(validation_fraction=spec.eval.validation_fraction,
                             eval_every_steps=spec.eval.eval_every_steps,
                             early_stopping_patience=spec.eval.early_stopping_patience,
                             early_stopping_min_delta=spec.eval.early_stopping_min_delta),
        priority=spec.priority,
        adapter_name=spec.adapter_name, state=pb.TrainingJob.State.Value(f"STATE_{job.state}"),
        trainable_params=job.trainable_params, total_params=job.total_params,
        progress=pb.Progress(**{k: v for k, v in job.progress.items()
                                if k in pb.Progress.DESCRIPTOR.fields_by_name}),
        create_time=timestamp(job.create_time), start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time), request_id=job.request_id or "")
    if spec.method == "lora":
        out.lora.CopyFrom(pb.LoraMethod(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                        target_modules=spec.lora.target_modules,
                                        lora_dropout=spec.lora.lora_dropout, bias=inv_bias[spec.lora.bias],
                                        use_rslora=spec.lora.use_rslora, use_dora=spec.lora.use_dora))
    elif spec.method == "full":
        out.full.CopyFrom(pb.FullMethod())
    else:
        out.feature_extraction.pooling = {v: k for k, v in _POOLING.items() if k}[spec.pooling]
    if job.error:
        out.error.CopyFrom(pb.JobError(**job.error))
    if job.result:
        out.result.CopyFrom(pb.JobResult(**job.result))
    return out


def entry_to_proto(e: Entry) -> pb.WatchTrainingJobResponse:
    out = pb.WatchTrainingJobResponse(seq=e.seq, time=timestamp(e.time))
    p = e.payload
    if e.kind == "state":
        out.state_change.state = pb.TrainingJob.State.Value(f"STATE_{p['state']}")
        if p.get("error"):
            out.state_change.error.CopyFrom(pb.JobError(**p["error"]))
    elif e.kind == "metric":
        out.metric.CopyFrom(pb.MetricPoint(**p))
    else:
        out.event.CopyFrom(pb.JobEvent(type=pb.JobEvent.Type.Value(f"TYPE_{p['type']}"),
                                       message=p["message"], data=p.get("data", {}),
                                       metrics=p.get("metrics", {})))
    return out


def report_to_proto(r) -> pb.DatasetReport:
    return pb.DatasetReport(
        ok=r.ok, format=r.format or "", num_examples=r.num_examples,
        num_validation_examples=r.num_validation_examples or 0,
        errors=[pb.DatasetIssue(line=e.line, field=e.field, message=e.message, source=e.source)
                for e in r.errors], error_count=r.error_count,
        lengths=pb.TokenLengths(**vars(r.lengths)) if r.lengths else None,
        truncated=r.truncated, dropped=r.dropped, duplicates=r.duplicates.count,
        leaked_examples=r.leakage.exact.count if r.leakage else 0,
        leaked_inputs=r.leakage.input.count if r.leakage else 0,
        coverage_mean=r.coverage_mean or 0.0, coverage_min=r.coverage_min or 0.0,
        eos_untrained=r.eos_untrained or 0, label_counts={str(k): v for k, v in (r.label_counts or {}).items()},
        steps=r.fit.steps if r.fit else 0, tokens_per_epoch=r.fit.tokens_per_epoch if r.fit else 0,
        trained_tokens_per_epoch=(r.fit.trained_tokens_per_epoch or 0) if r.fit else 0,
        details_json=json.dumps(r.to_dict()),
        estimated_seconds=(r.fit.estimated_seconds or 0.0) if r.fit else 0.0,
        step_seconds=((r.fit.estimated_seconds or 0.0) / r.fit.steps) if r.fit and r.fit.steps else 0.0)


def _job_id(name: str) -> str:
    job_id = name.removeprefix("trainingJobs/")
    if not job_id or "/" in job_id:
        raise invalid("name", "must be 'trainingJobs/{id}' or an id")
    return job_id


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, jobs: JobService):
        self.jobs = jobs

    async def CreateTrainingJob(self, request, context):
        if not request.HasField("training_job"):
            raise invalid("training_job", "is required")
        job = await self.jobs.create(spec_from_proto(request.training_job), request.request_id or None)
        return pb.CreateTrainingJobResponse(training_job=job_to_proto(job))

    async def GetTrainingJob(self, request, context):
        return pb.GetTrainingJobResponse(training_job=job_to_proto(self.jobs.get(_job_id(request.name))))

    async def ListTrainingJobs(self, request, context):
        state = None
        if request.state:
            if request.state not in pb.TrainingJob.State.values():  # proto3 enums are open
                raise invalid("state", f"unknown state {request.state}")
            state = pb.TrainingJob.State.Name(request.state).removeprefix("STATE_")
        jobs, nxt = self.jobs.list(state=state, page_size=request.page_size,
                                   page_token=request.page_token)
        return pb.ListTrainingJobsResponse(training_jobs=[job_to_proto(j) for j in jobs],
                                           next_page_token=nxt)

    async def CancelTrainingJob(self, request, context):
        job = await self.jobs.cancel(_job_id(request.name))
        return pb.CancelTrainingJobResponse(training_job=job_to_proto(job))

    async def ListCheckpoints(self, request, context):
        checkpoints, nxt = self.jobs.checkpoints(_job_id(request.name), page_size=request.page_size,
                                                 page_token=request.page_token)
        return pb.ListCheckpointsResponse(next_page_token=nxt, checkpoints=[
            pb.Checkpoint(step=c.step, metrics=c.metrics, uri=c.uri, best=c.best, create_time=timestamp(c.time))
            for c in checkpoints])

    async def PublishCheckpoint(self, request, context):
        result = await self.jobs.publish_checkpoint(_job_id(request.name), request.step)
        return pb.PublishCheckpointResponse(result=pb.JobResult(**result))

    async def ValidateDataset(self, request, context):
        r = await asyncio.to_thread(
            self.jobs.validate_dataset, request.base_model, request.training_data.path,
            request.validation_data.path, max_seq_length=request.max_seq_length or 512,
            batch_size=request.batch_size or 8, num_epochs=request.num_epochs or 1,
            max_steps=request.max_steps, measure_step_time=request.measure_step_time)
        return pb.ValidateDatasetResponse(report=report_to_proto(r))

    async def UploadDataset(self, request_iterator, context):
        upload = None
        try:
            async for req in request_iterator:
                if req.HasField("header"):
                    if upload is not None:
                        raise invalid("header", "only the first message may be a header")
                    upload = self.jobs.upload(req.header.filename)
                elif upload is None:
                    raise invalid("header", "the first message must be the header")
                else:
                    upload.write(req.chunk)
            if upload is None:
                raise invalid("header", "the first message must be the header")
            path, sha, size, dedup = upload.finish()
            upload = None
            return pb.UploadDatasetResponse(path=path, sha256=sha, size_bytes=size, deduplicated=dedup)
        finally:
            if upload is not None:  # the client went away or sent something wrong: leave nothing
                upload.abort()

    async def WatchTrainingJob(self, request, context):
        if request.after_seq < 0:
            raise invalid("after_seq", "must be >= 0")
        async for entry in self.jobs.watch(_job_id(request.name), request.after_seq):
            yield entry_to_proto(entry)


class WorkerServicer(worker_pb2_grpc.TrainerWorkerServiceServicer):
    """Reports from training workers, authenticated by the per-job token."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    async def ReportProgress(self, request, context):
        token = dict(context.invocation_metadata() or ()).get("x-tunewire-job-token", "")
        job_id = request.job_id
        self.scheduler.authenticate(job_id, token)
        kind = request.WhichOneof("report")
        if kind == "started":
            s = request.started
            self.scheduler.report_started(job_id, trainable=s.trainable_params, total=s.total_params,
                                     total_steps=s.total_steps, pid=s.pid)
        elif kind == "metric":
            m = request.metric
            self.scheduler.report_metric(job_id, {f.name: getattr(m, f.name)
                                             for f in pb.MetricPoint.DESCRIPTOR.fields})
        elif kind == "event":
            ev = request.event
            if ev.type not in pb.JobEvent.Type.values():  # an enum value this trainer does not know
                raise invalid("event.type", f"unknown event type {ev.type}")
            self.scheduler.report_event(job_id, pb.JobEvent.Type.Name(ev.type).removeprefix("TYPE_"),
                                   ev.message, dict(ev.data), dict(ev.metrics))
        elif kind == "finished":
            self.scheduler.report_finished(job_id, request.finished.adapter_dir, dict(request.finished.metrics))
        elif kind == "failed":
            e = request.failed.error
            self.scheduler.report_failed(job_id, {"reason": e.reason, "message": e.message,
                                             "user_error": e.user_error, "retryable": e.retryable})
        else:
            raise TunewireError(R.REPORT_EMPTY, "a report is required")
        return worker_pb2.ReportProgressResponse(cancel_requested=self.scheduler.cancel_requested(job_id))
