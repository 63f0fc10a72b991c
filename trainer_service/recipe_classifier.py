"""Text-classification recipe by feature extraction: a frozen LM body and a trained linear head.

One job, read top to bottom: setup, extract features, train the head, save, clean up.

`run(settings, out_dir, reporter, should_stop, device="auto")` reads rows `{"text": str, "label": str|int}`
from JSONL, JSON, CSV or Parquet files through the readers every method uses
(trainer_service.data_rows, so a file the create-time check and the pre-flight report accept is
one it can read), runs the base model's frozen body ONCE over every training and validation text,
pools the last hidden states ("mean" over the real tokens or the "last" real token) and caches
them. Only a `torch.nn.Linear(hidden, num_classes)` then trains, over the cached features, with
AdamW and a learning rate that decays linearly to 0. The body's weights never change, so that is the whole job; on a CPU the head's
steps take microseconds and the one pass through the body is what costs.

The head trains on standardized features (per-dimension mean and standard deviation of the
training features), which keeps Adam well conditioned when a model has a few huge hidden
dimensions. The standardization is folded into the head before it is saved, so the artifact in
out_dir/classifier (head.safetensors, classifier.json) is a plain linear layer over the raw pooled
hidden state. Tokenizing, the body, pooling, the head's files and `predict` are
tunewire/features.py, shared with serving, so a served prediction equals the one evaluated here.

Validation: `validation_data`, or else a stratified `validation_fraction` of the training rows
(every class keeps at least one training row). Evaluations (eval_loss, accuracy, macro_f1) run
every `eval_every` steps (0: at the end of every epoch) and at the end; the final one uses the
saved head on raw features, so its numbers are those of the artifact.

Metrics per step: `tokens_seen` counts the real (non-pad) tokens of the examples of every step's
batch (a later epoch counts them again, as in the LoRA recipe); `tokens_per_second` is the batch's
real tokens over the head step's wall time. The body's cost is not in it: it ran once over all
texts before step 1, and `feature_seconds` / `feature_tokens` in the returned metrics report that
pass.

Device: the body runs on `device` (tunewire/devices.py: "auto" = the GPU when there is one) in
the precision devices.resolve_precision("auto") picks there (fp32 on a CPU, bf16 on a GPU that
has it; classifier.json records it as feature_precision). The pooled features come back to the
CPU in fp32 and the head trains there in fp32: it is a few thousand numbers, too small for a GPU
to help, and fp32 keeps its optimisation exact.

Threads: `TUNEWIRE_TRAIN_THREADS` (default: all cores) sets torch's intra-op threads.
"""

from __future__ import annotations

import gc
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer_service.common import clip_gradients
from trainer_service.data_readers import DatasetIssue
from trainer_service.data_rows import load_examples, scan_file
from trainer_service.loop import Cancelled, Reporter, loss_metrics  # one protocol for every recipe
from tunewire.adapters import base_model_fingerprint
from tunewire import devices
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.features import POOLINGS, Label, encode, pad_id, pooled_features, predict, write_head
# The body loader is this module's attribute so that tests can count or replace it.
from tunewire.features import load_feature_body as _load_body
from tunewire.loading import load_tokenizer

__all__ = ["ClassifierSettings", "run", "predict", "macro_f1"]


@dataclass(frozen=True)
class ClassifierSettings:
    base_model: str                           # HF model directory (config.json, tokenizer, weights)
    training_data: str                        # data file of {"text": str, "label": str|int} rows
    validation_data: str | None = None        # same format; None = hold out validation_fraction
    validation_fraction: float = 0.1          # share of each class held out when no validation_data
    pooling: str = "mean"                     # "mean" over real tokens | "last" real token
    learning_rate: float = 1e-3               # AdamW peak rate, decays linearly to 0
    num_epochs: int = 3                       # passes over the data (ignored if max_steps > 0)
    max_steps: int = 0                        # optimizer steps; > 0 overrides num_epochs
    batch_size: int = 16                      # examples per optimizer step
    max_seq_length: int = 256                 # texts are truncated to this many tokens
    eval_every: int = 0                       # evaluate every this many steps; 0 = once per epoch
    seed: int = 0                             # validation split, shuffling and head init

    def __post_init__(self):
        if not self.base_model:
            raise ValueError("base_model is required")
        if not self.training_data:
            raise ValueError("training_data is required")
        if self.validation_data is not None and not self.validation_data:
            raise ValueError("validation_data must be None or a path")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in (0, 1)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError("learning_rate must be in (0, 1]")
        if not 1 <= self.num_epochs <= 1000:
            raise ValueError("num_epochs must be in [1, 1000]")
        if not 0 <= self.max_steps <= 1_000_000:
            raise ValueError("max_steps must be in [0, 1000000]")
        if not 1 <= self.batch_size <= 4096:
            raise ValueError("batch_size must be in [1, 4096]")
        if not 8 <= self.max_seq_length <= 32768:
            raise ValueError("max_seq_length must be in [8, 32768]")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


@dataclass(frozen=True)
class _Row:
    text: str
    label: Label
    line: int     # its line (or row) in its file, from 1
    unit: str     # "line" or "row" (Parquet, JSON arrays)
    source: str   # its file: "train" or "validation"

    def invalid(self, field: str, message: str) -> TunewireError:
        """DATASET_INVALID naming this row: "validation data line 4: field label: ..."."""
        issue = DatasetIssue(self.line, field, message, self.source)
        return TunewireError(R.DATASET_INVALID, issue.describe(self.unit))


def run(settings: ClassifierSettings, out_dir: Path, reporter: Reporter,
        should_stop: Callable[[], bool], *, device: str = "auto") -> dict[str, float]:
    """Trains the head and saves it to out_dir/"classifier"; returns the final metrics.
    `device` ("auto" | "cpu" | "cuda") is where the body extracts the features.

    Raises Cancelled when should_stop() is true (checked before every feature batch, every step
    and before saving), TunewireError for bad input or training that cannot go on.
    """
    s = settings

    # ---- setup ---------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(s.seed)  # python, numpy and torch: head init and shuffling repeat
    torch.set_num_threads(int(os.environ.get("TUNEWIRE_TRAIN_THREADS", os.cpu_count() or 1)))

    tokenizer = load_tokenizer(s.base_model)
    # Data before the model: a bad file fails in seconds instead of after loading the weights.
    train_rows = _read_rows(s.training_data, "train")
    if s.validation_data is not None:
        val_rows = _read_rows(s.validation_data, "validation")
    else:
        train_rows, val_rows = _hold_out(train_rows, s.validation_fraction, s.seed)
    labels = _label_list(train_rows, val_rows)
    label_index = {label: i for i, label in enumerate(labels)}
    train_ids, train_cut = _tokenize(tokenizer, train_rows, s.max_seq_length)
    val_ids, val_cut = _tokenize(tokenizer, val_rows, s.max_seq_length)
    truncated = train_cut + val_cut
    train_tokens = [len(ids) for ids in train_ids]
    reporter.event("DATASET_LOADED",
                   f"{len(train_rows)} training and {len(val_rows)} validation examples, "
                   f"{len(labels)} labels, {sum(train_tokens)} training tokens ({truncated} "
                   f"truncated to max_seq_length)",
                   {"examples": str(len(train_rows)), "validation_examples": str(len(val_rows)),
                    "labels": str(len(labels)), "tokens": str(sum(train_tokens)),
                    "truncated": str(truncated), "max_seq_length": str(s.max_seq_length)})

    dev = devices.resolve_device(device)
    dtype = devices.resolve_precision("auto", dev)
    precision = devices.precision_name(dtype)
    body = _load_body(s.base_model, dev, dtype)
    body_params = sum(p.numel() for p in body.parameters())
    hidden = int(body.config.hidden_size)
    reporter.event("MODEL_LOADED", f"loaded {s.base_model} on {dev.type} in {precision}",
                   {"base_model": s.base_model, "parameters": str(body_params),
                    "device": dev.type, "precision": precision})

    # ---- extract features ----------------------------------------------------------------
    # The frozen body maps a text to the same vector in every epoch: compute it once.
    def before_batch():
        if should_stop():
            raise Cancelled("stopped while extracting features")

    t0 = time.perf_counter()
    pad = pad_id(tokenizer)
    train_x = pooled_features(body, train_ids, pad, s.pooling, before_batch)
    val_x = pooled_features(body, val_ids, pad, s.pooling, before_batch)
    feature_seconds = time.perf_counter() - t0
    feature_tokens = sum(train_tokens) + sum(len(ids) for ids in val_ids)
    train_y = torch.tensor([label_index[r.label] for r in train_rows])
    val_y = torch.tensor([label_index[r.label] for r in val_rows])
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dimensions stay as they are
    train_z, val_z = (train_x - mean) / std, (val_x - mean) / std

    head = torch.nn.Linear(hidden, len(labels))
    torch.nn.init.zeros_(head.weight)  # convex problem: zero start, loss starts at ln(classes)
    torch.nn.init.zeros_(head.bias)
    trainable = sum(p.numel() for p in head.parameters())
    steps_per_epoch = math.ceil(len(train_rows) / s.batch_size)
    total_steps = s.max_steps if s.max_steps > 0 else steps_per_epoch * s.num_epochs
    eval_every = s.eval_every or steps_per_epoch
    optimizer = torch.optim.AdamW(head.parameters(), lr=s.learning_rate, weight_decay=0.0)
    reporter.started(trainable, body_params + trainable, total_steps)

    # ---- train ---------------------------------------------------------------------------
    shuffle = torch.Generator().manual_seed(s.seed)
    losses: list[float] = []
    tokens_seen = 0
    t_start = time.perf_counter()
    step = 0
    # The head's tensors are far too small to split across threads, and on a busy CPU waking
    # the other threads for every tiny op costs more than the op (measured: up to 50x slower
    # with 2 threads on a loaded 2-core machine). The body's pass above used them all.
    with _threads(1):
        while step < total_steps:  # epochs; with max_steps the data repeats as often as needed
            order = torch.randperm(len(train_rows), generator=shuffle)
            for first in range(0, len(order), s.batch_size):
                if step >= total_steps:
                    break
                if should_stop():
                    raise Cancelled(f"stopped before step {step + 1} of {total_steps}")
                step += 1
                t0 = time.perf_counter()
                batch = order[first:first + s.batch_size]
                lr = s.learning_rate * (total_steps - step + 1) / total_steps
                for group in optimizer.param_groups:
                    group["lr"] = lr

                loss = F.cross_entropy(head(train_z[batch]), train_y[batch])
                if not torch.isfinite(loss):
                    raise TunewireError(R.TRAINING_DIVERGED, f"loss is {loss.item()} at step {step}; "
                                        f"try a lower learning_rate")
                loss.backward()
                grad_norm = clip_gradients(list(head.parameters()), 0.0)  # 0: norm only, no clip
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                real_tokens = sum(train_tokens[i] for i in batch.tolist())
                tokens_seen += real_tokens
                losses.append(loss.item())
                reporter.metric(step=step, epoch=step / steps_per_epoch, loss=losses[-1],
                                learning_rate=lr, grad_norm=grad_norm,
                                tokens_per_second=real_tokens / max(time.perf_counter() - t0, 1e-9),
                                tokens_seen=tokens_seen, total_steps=total_steps)
                if step % eval_every == 0 and step < total_steps:
                    reporter.evaluation(step=step,
                                        metrics=_evaluate(head, val_z, val_y, len(labels)))
    train_seconds = time.perf_counter() - t_start

    # Fold the standardization into the head: W z + b = (W / std) x + (b - (W / std) mean).
    weight = (head.weight.detach() / std).contiguous()
    bias = (head.bias.detach() - weight @ mean).contiguous()
    final_head = torch.nn.Linear(hidden, len(labels))
    with torch.no_grad():
        final_head.weight.copy_(weight)
        final_head.bias.copy_(bias)
    final = _evaluate(final_head, val_x, val_y, len(labels))
    reporter.evaluation(step=step, metrics=final)

    # ---- save ----------------------------------------------------------------------------
    if should_stop():
        raise Cancelled("stopped after training, before saving")
    classifier_dir = write_head(Path(out_dir) / "classifier", weight=weight, bias=bias,
                                labels=labels, pooling=s.pooling, max_seq_length=s.max_seq_length,
                                base_fingerprint=base_model_fingerprint(s.base_model),
                                feature_precision=precision)
    reporter.event("ADAPTER_SAVED", f"classifier head saved to {classifier_dir}",
                   {"path": str(classifier_dir), "trainable_params": str(trainable)})

    # ---- cleanup -------------------------------------------------------------------------
    # The worker may report for a while after this; give the memory back now.
    del body, optimizer, train_x, val_x, train_z, val_z
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {**loss_metrics(losses), **final, "steps": float(step), "train_tokens": float(tokens_seen),
            "train_seconds": train_seconds, "feature_seconds": feature_seconds,
            "feature_tokens": float(feature_tokens), "examples": float(len(train_rows)),
            "validation_examples": float(len(val_rows)), "truncated_examples": float(truncated),
            "num_labels": float(len(labels))}


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

    The classes are those that occur in y_true or y_pred (a class absent from both says nothing
    about the classifier), as scikit-learn does without `labels`; 0.0 for no examples.
    """
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    tp: dict[int, int] = {}
    fp: dict[int, int] = {}
    fn: dict[int, int] = {}
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] = tp.get(t, 0) + 1
        else:
            fp[p] = fp.get(p, 0) + 1
            fn[t] = fn.get(t, 0) + 1
    classes = set(y_true) | set(y_pred)
    scores = [2 * tp.get(c, 0) / (2 * tp.get(c, 0) + fp.get(c, 0) + fn.get(c, 0)) for c in classes]
    return sum(scores) / len(scores) if scores else 0.0


def _read_rows(path: str, source: str) -> list[_Row]:
    """The {"text", "label"} rows of a data file, read and checked by the readers every method
    uses (trainer_service.data_rows: JSONL, JSON, CSV or Parquet; errors name the line or row
    and the field); DATASET_NOT_FOUND, DATASET_INVALID, DATASET_EMPTY, or METHOD_DATA_MISMATCH
    for rows of another format."""
    scan = scan_file(path, source)
    examples = load_examples(path, scan=scan)  # DATASET_NOT_FOUND first when there is no file
    if scan.format != "classification":
        what = "validation" if source == "validation" else "training"
        raise TunewireError(R.METHOD_DATA_MISMATCH, f"{what} data {path} holds {scan.format} rows; "
                            f"feature extraction learns from text/label rows")
    return [_Row(ex["text"], ex["label"], line, scan.unit, source)
            for ex, line in zip(examples, scan.lines)]


def _hold_out(rows: list[_Row], fraction: float, seed: int) -> tuple[list[_Row], list[_Row]]:
    """Stratified split: about `fraction` of each label's rows, and never a label's last row."""
    rng = random.Random(seed)
    by_label: dict[Label, list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault(r.label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_label, key=_label_key):
        idx = by_label[label]
        rng.shuffle(idx)
        held.update(idx[:min(len(idx) - 1, int(len(idx) * fraction + 0.5))])
    if not held:  # tiny data: take one row of the largest label that can spare one
        largest = max(by_label.values(), key=len)
        if len(largest) < 2:
            raise TunewireError(R.DATASET_INVALID, f"too few training examples ({len(rows)}) to hold "
                                "out a validation split; add examples or give validation_data")
        held.add(largest[0])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def _label_key(label: Label) -> tuple[bool, Label]:
    return (isinstance(label, str), label)


def _label_list(train: list[_Row], val: list[_Row]) -> list[Label]:
    """The classes in a stable order (sorted), checked: at least 2, none only in validation."""
    labels = sorted({r.label for r in train}, key=_label_key)
    if len(labels) < 2:
        raise TunewireError(R.DATASET_INVALID, f"training data has {len(labels)} label "
                            f"({labels[0]!r}); a classifier needs at least 2")
    known = set(labels)
    for r in val:
        if r.label not in known:
            raise r.invalid("label", f"{r.label!r} does not occur in the training data")
    return labels


def _tokenize(tokenizer, rows: list[_Row], max_seq_length: int) -> tuple[list[list[int]], int]:
    return encode(tokenizer, [r.text for r in rows], max_seq_length,
                  no_tokens=lambda i: rows[i].invalid("text", "the tokenizer makes no tokens of it"))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _evaluate(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              num_classes: int) -> dict[str, float]:
    logits = head(x)
    pred = logits.argmax(-1)
    return {"eval_loss": F.cross_entropy(logits, y).item(),
            "accuracy": (pred == y).float().mean().item(),
            "macro_f1": macro_f1(y.tolist(), pred.tolist())}
