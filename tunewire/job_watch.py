"""Follow a training job on the console: WatchTrainingJob as a live progress bar (step, loss,
tokens/s) with one log line per state change and event. Used by `tunewire jobs watch`,
`tunewire jobs create --watch` and the demo.

    from tunewire.job_watch import watch_job
    ok = watch_job(trainer_stub, "trainingJobs/<id>") == 0
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunewire.trainer.v1 import trainer_pb2 as pb


def watch_job(stub, job_id: str, after_seq: int = 0, console: Console | None = None) -> int:
    """Follows the job until its stream ends; 0 if it SUCCEEDED, else 1."""
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
