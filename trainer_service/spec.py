"""What a training job asks for: typed, frozen settings checked on construction.

The servicer builds a `JobSpec` from the request (errors become INVALID_ARGUMENT with a field
violation named after the proto field), the store keeps it as JSON, and the worker reads it back.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from tunewire import reasons as R
from tunewire.devices import PRECISIONS
from tunewire.errors import invalid

ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
BIASES = ("none", "all", "lora_only")
QUANTIZATIONS = ("none", "nf4")                # of the frozen base; nf4 = QLoRA
METHODS = ("lora", "full", "feature_extraction")
# Which row formats (trainer_service.data_rows.FORMATS) each method can learn from.
METHOD_FORMATS = {"lora": ("prompt_completion", "messages", "text"),
                  "full": ("prompt_completion", "messages", "text"),
                  "feature_extraction": ("classification",)}


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8                                # rank of the update matrices
    lora_alpha: float | None = None           # scaling numerator; None means 2 * r
    target_modules: tuple[str, ...] = ()      # module names to adapt; () = peft's model default
    lora_dropout: float = 0.0                 # dropout on the LoRA input, in [0, 1)
    bias: str = "none"                        # which biases train: none | all | lora_only
    use_rslora: bool = False                  # scale by alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False                    # weight-decomposed LoRA (vLLM cannot serve it)

    def __post_init__(self):
        if not 1 <= self.r <= 256:
            raise invalid("training_job.lora.r", "must be in [1, 256]")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise invalid("training_job.lora.lora_alpha", "must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise invalid("training_job.lora.lora_dropout", "must be in [0, 1)")
        if self.bias not in BIASES:
            raise invalid("training_job.lora.bias", f"must be one of {BIASES}")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise invalid("training_job.lora.target_modules", "all-linear stands alone")
        for m in self.target_modules:
            if not MODULE_NAME_RE.match(m):
                raise invalid("training_job.lora.target_modules", f"bad module name {m!r}")

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.r


@dataclass(frozen=True)
class Hyperparameters:
    learning_rate: float = 2e-4               # AdamW peak learning rate
    num_epochs: int = 1                       # passes over the data (ignored if max_steps > 0)
    max_steps: int = 0                        # optimizer steps; > 0 overrides num_epochs
    batch_size: int = 8                       # examples per optimizer step
    max_seq_length: int = 512                 # examples are truncated to this many tokens
    warmup_steps: int = 0                     # linear warm-up, then linear decay to 0
    weight_decay: float = 0.0                 # AdamW weight decay
    max_grad_norm: float = 1.0                # clip the gradients' total L2 norm to this; 0 = no clipping
    seed: int = 0                             # shuffling, dropout and LoRA init
    num_processes: int = 1                    # DDP worker processes (torchrun) splitting each batch
    packing: bool = False                     # pack examples into max_seq_length rows
    num_nodes: int = 1                        # pods of a multi-node run (Kubernetes launcher only)
    precision: str = "auto"                   # PRECISIONS; auto = bf16 on a GPU with bf16, else fp32
    gradient_checkpointing: bool = False      # recompute activations in backward: less memory
    gradient_accumulation_steps: int = 1      # micro-batches per optimizer step (batch_size split)
    quantization: str = "none"                # QUANTIZATIONS; nf4 = QLoRA (LoRA, CUDA, bitsandbytes)

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward + backward pass on one process."""
        return self.batch_size // (self.gradient_accumulation_steps * self.num_processes * self.num_nodes)

    def __post_init__(self):
        p = "training_job.hyperparameters."
        if not 0 < self.learning_rate <= 1:
            raise invalid(p + "learning_rate", "must be in (0, 1]")
        if not 1 <= self.num_epochs <= 1000:
            raise invalid(p + "num_epochs", "must be in [1, 1000]")
        if not 0 <= self.max_steps <= 1_000_000:
            raise invalid(p + "max_steps", "must be in [0, 1000000]")
        if not 1 <= self.batch_size <= 1024:
            raise invalid(p + "batch_size", "must be in [1, 1024]")
        if not 8 <= self.max_seq_length <= 32768:
            raise invalid(p + "max_seq_length", "must be in [8, 32768]")
        if self.warmup_steps < 0:
            raise invalid(p + "warmup_steps", "must be >= 0")
        if self.weight_decay < 0:
            raise invalid(p + "weight_decay", "must be >= 0")
        if self.max_grad_norm < 0:
            raise invalid(p + "max_grad_norm", "must be >= 0")
        if not 1 <= self.num_processes <= 64:
            raise invalid(p + "num_processes", "must be in [1, 64]")
        if not 1 <= self.num_nodes <= 64:
            raise invalid(p + "num_nodes", "must be in [1, 64]")
        if self.precision not in PRECISIONS:
            raise invalid(p + "precision", f"must be one of {PRECISIONS}")
        if self.quantization not in QUANTIZATIONS:
            raise invalid(p + "quantization", f"must be one of {QUANTIZATIONS}")
        if not 1 <= self.gradient_accumulation_steps <= 1024:
            raise invalid(p + "gradient_accumulation_steps", "must be in [1, 1024]")
        if self.batch_size % (self.gradient_accumulation_steps * self.num_processes * self.num_nodes):
            raise invalid(p + "batch_size", "must be a multiple of gradient_accumulation_steps x "
                          "num_nodes x num_processes")


@dataclass(frozen=True)
class EvalSpec:
    validation_fraction: float | None = None  # held-out share; None = 0.1 if >= 20 examples else 0
    eval_every_steps: int = 0                 # evaluate + checkpoint every N steps; 0 = 10 per run, >= 5 apart
    early_stopping_patience: int = 3          # evaluations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0     # smallest eval_loss decrease that counts

    def __post_init__(self):
        p = "training_job.eval."
        if self.validation_fraction is not None and not 0 <= self.validation_fraction < 1:
            raise invalid(p + "validation_fraction", "must be in [0, 1)")
        if self.eval_every_steps < 0:
            raise invalid(p + "eval_every_steps", "must be >= 0")
        if self.early_stopping_patience < 0:
            raise invalid(p + "early_stopping_patience", "must be >= 0")
        if self.early_stopping_min_delta < 0:
            raise invalid(p + "early_stopping_min_delta", "must be >= 0")

    def fraction_for(self, n_examples: int) -> float:
        if self.validation_fraction is not None:
            return self.validation_fraction
        return 0.1 if n_examples >= 20 else 0.0


@dataclass(frozen=True)
class JobSpec:
    base_model: str                           # HF model directory (config.json, tokenizer, weights)
    training_data: str                        # data file (.jsonl, .json, .csv, .parquet), see data_rows
    adapter_name: str                         # publish the adapter under this name
    lora: LoraSpec = field(default_factory=LoraSpec)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    validation_data: str = ""                 # held-out examples, same formats; "" = split training_data
    eval: EvalSpec = field(default_factory=EvalSpec)
    priority: int = 0                         # higher runs first among queued jobs
    method: str = "lora"                      # lora | full | feature_extraction
    pooling: str = "mean"                     # feature_extraction: mean | last
    json_schema: str = ""                     # JSON schema of completions: enables JSON evals
    publish_only: bool = False                # store only: no handoff, no serving check at create

    def __post_init__(self):
        if not self.base_model:
            raise invalid("training_job.base_model", "is required")
        if not self.training_data:
            raise invalid("training_job.training_data.path", "is required")
        if self.method not in METHODS:
            raise invalid("training_job.method", f"must be one of {METHODS}")
        if self.json_schema:
            _check_schema(self.json_schema)
        if self.hyperparameters.num_processes > 1 and self.method != "lora":
            raise invalid("training_job.hyperparameters.num_processes",
                          "more than one process is supported for lora only")
        if self.hyperparameters.quantization != "none" and self.method != "lora":
            raise invalid("training_job.hyperparameters.quantization",
                          "quantization (QLoRA) is for the lora method only",
                          R.QUANTIZATION_UNAVAILABLE)
        if self.pooling not in ("mean", "last"):
            raise invalid("training_job.feature_extraction.pooling", "must be mean or last")
        if not -1000 <= self.priority <= 1000:
            raise invalid("training_job.priority", "must be in [-1000, 1000]")
        if not ADAPTER_NAME_RE.match(self.adapter_name or ""):
            raise invalid("training_job.adapter_name",
                          "must match [a-z0-9][a-z0-9_-]{0,62}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        d = json.loads(text)
        lora = dict(d.pop("lora"))
        lora["target_modules"] = tuple(lora.get("target_modules", ()))
        return cls(lora=LoraSpec(**lora), hyperparameters=Hyperparameters(**d.pop("hyperparameters")),
                   eval=EvalSpec(**d.pop("eval", {})), **d)


def _check_schema(text: str) -> None:
    import jsonschema

    try:
        schema = json.loads(text)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except (ValueError, jsonschema.SchemaError) as e:
        raise invalid("training_job.json_schema", f"not a valid JSON schema: {e}", R.JSON_SCHEMA_INVALID) from None
