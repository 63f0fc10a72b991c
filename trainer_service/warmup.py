"""Times one training step for the pre-flight fit estimate, in a process of its own (the trainer
service never loads models).

    echo '<JobSpec JSON>' | python -m trainer_service.warmup [--device auto|cpu|cuda]
    → {"step_seconds": 0.42}

It loads the tokenizer, the first batch of the training file, the model as the recipe builds it
(on the device, in the job's precision, gradient checkpointing, LoRA / QLoRA for LoRA jobs), and
times a forward + backward on that batch in the job's micro-batches, synchronised with the
device (`loop.warmup_seconds`).
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer_service import common, loop, recipe_full, recipe_lora
from trainer_service.data_rows import load_examples
from trainer_service.data_tokens import tokenize_dataset
from trainer_service.spec import JobSpec
from tunewire import loading


def measure(spec: JobSpec, device: str = "auto") -> float:
    hp = spec.hyperparameters
    compute = common.Compute.for_job(hp.precision, device)
    tokenizer = loading.load_tokenizer(spec.base_model)
    examples = load_examples(spec.training_data)[:hp.batch_size]
    rows, _ = tokenize_dataset(examples, tokenizer, hp.max_seq_length,
                               eos_ids=loading.stop_ids(spec.base_model, tokenizer))
    if spec.method == "lora":
        model = recipe_lora.build_model(spec, compute)
    else:
        model = recipe_full.build_model(spec, compute)
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return loop.warmup_seconds(model, rows, pad_id, compute=compute,
                               micro_batch_size=hp.micro_batch_size)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="time one training step of a job (JSON on stdin)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args()
    print(json.dumps({"step_seconds": measure(JobSpec.from_json(sys.stdin.read()), args.device)}))
