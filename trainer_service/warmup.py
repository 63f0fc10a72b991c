"""Times one training step for the pre-flight fit estimate, in a process of its own (the trainer
service never loads models).

    echo '<JobSpec JSON>' | python -m trainer_service.warmup     → {"step_seconds": 0.42}

It loads the tokenizer, the first batch of the training file, the base model (with LoRA for LoRA
jobs), and times a forward + backward on that batch (`loop.warmup_seconds`).
"""

from __future__ import annotations

import json
import sys

from trainer_service import loop, recipe_lora
from trainer_service.data_rows import load_examples
from trainer_service.data_tokens import tokenize_dataset
from trainer_service.spec import JobSpec
from tunewire import loading


def measure(spec: JobSpec) -> float:
    hp = spec.hyperparameters
    tokenizer = loading.load_tokenizer(spec.base_model)
    examples = load_examples(spec.training_data)[:hp.batch_size]
    rows, _ = tokenize_dataset(examples, tokenizer, hp.max_seq_length,
                               eos_ids=loading.stop_ids(spec.base_model, tokenizer))
    model = loading.load_causal_lm(spec.base_model)
    if spec.method == "lora":
        model = recipe_lora.add_lora(model, spec)
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return loop.warmup_seconds(model, rows, pad_id)


if __name__ == "__main__":
    print(json.dumps({"step_seconds": measure(JobSpec.from_json(sys.stdin.read()))}))
