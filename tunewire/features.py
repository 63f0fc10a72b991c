"""Texts to the features a feature-extraction classifier head consumes, shared by training and serving.

A classifier head (trained by trainer_service/recipe_classifier.py, served by
serving_service/classify.py) is a plain linear layer over a pooled last hidden state of the
frozen base model body (AutoModel: the transformer without its LM head, eval mode; fp32 on a
CPU, bf16 by default on a GPU: `load_feature_body`). The body and the pooling run on the body's
device; the pooled features come back as fp32 CPU tensors, and the head's math is fp32. A
served prediction equals the one training evaluated only if both sides turn a text into that
vector the same way, so everything that does it lives here, once:

    encode()           token ids as the tokenizer makes them by default (special tokens
                       included), truncated to the head's max_seq_length
    load_feature_body() the frozen body on a device, in the precision devices.py picks there
                       (tunewire/loading.py loads the tokenizer and the body)
    pooled_features()  "mean" over the real tokens or the "last" real token, in batches of texts
                       of similar length
    write_head(),      the saved head and its checks against the base model it is applied to
    read_head()
    predict()          all of it in one call, loading everything each time: the reference

A head directory holds:

    head.safetensors   weight [num_labels, hidden], bias [num_labels], fp32
    classifier.json    method "feature_extraction", id2label {"0": label, ...}, num_labels,
                       pooling, hidden_size, max_seq_length, base_model_fingerprint, and
                       feature_precision (the body's when training extracted the features:
                       "fp32", "bf16"; informative, a head applies at any precision)

(a published one also has the adapter store's manifest.json, see tunewire/adapters.py).

torch and transformers are imported inside the functions, so importing this module is cheap.
Errors are `TunewireError`s (FAILED_PRECONDITION reasons), in a service and in a training job alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunewire.adapters import base_model_fingerprint
from tunewire import devices, loading  # loading.load_body as an attribute: tests count the loads
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.loading import load_tokenizer

if TYPE_CHECKING:
    import torch

POOLINGS = ("mean", "last")
METHOD = "feature_extraction"
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "classifier.json"
# Padded tokens per forward pass of the body (texts sorted by length, so little of it is padding).
FEATURE_TOKEN_BUDGET = 8192

Label = str | int


def encode(tokenizer, texts: list[str], max_seq_length: int,
           no_tokens: Callable[[int], Exception]) -> tuple[list[list[int]], int]:
    """Token ids of each text, truncated to max_seq_length; and how many were truncated.

    A text without tokens has no features: `no_tokens(index)` makes the error raised for it, so
    each caller names the text its own way (a data file's line, a request's field).
    """
    ids = tokenizer(texts, verbose=False).input_ids
    for i, row in enumerate(ids):
        if not row:
            raise no_tokens(i)
    long = [i for i, row in enumerate(ids) if len(row) > max_seq_length]
    if long:  # the tokenizer truncates, so special tokens it adds at the end stay
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_seq_length,
                        verbose=False).input_ids
        for i, row in zip(long, cut):
            ids[i] = row
    return ids, len(long)


def pad_id(tokenizer) -> int:
    # Padding never reaches the pooled features (right padding, masked), so any id works.
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def length_batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices, longest first, in batches of at most `budget` padded tokens (at least one text)."""
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def load_feature_body(base_model: str | Path, device="cpu", dtype=None):
    """The frozen body for features on `device` (a torch.device, or "cpu" / "cuda" / "auto" as
    devices.resolve_device takes them) in `dtype` (a torch dtype; None = devices.resolve_precision
    "auto": fp32 on a CPU, bf16 on a GPU that has it). Loaded straight onto a GPU; on a CPU
    with the loader's own placement, as it always was."""
    import torch

    if isinstance(device, str):
        device = devices.resolve_device(device) if device in devices.DEVICES else torch.device(device)
    dtype = dtype or devices.resolve_precision("auto", device)
    return loading.load_body(base_model, dtype=dtype,
                             device=None if device.type == "cpu" else device)


def pooled_features(body, ids: list[list[int]], pad: int, pooling: str,
                    before_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Pooled last hidden state of every text, [len(ids), hidden] fp32 on the CPU, in the order
    of `ids`. The forward pass and the pooling (in fp32) run on the body's device.

    Every row of `ids` must be non-empty. `before_batch` runs before every forward pass; it may
    raise to stop (a training job's cancellation).
    """
    import torch

    device = body.device
    out = torch.empty(len(ids), int(body.config.hidden_size))
    with torch.inference_mode():
        for batch in length_batches([len(x) for x in ids], FEATURE_TOKEN_BUDGET):
            if before_batch is not None:
                before_batch()
            width = len(ids[batch[0]])
            # Right padding: causal attention keeps pads out of every real token's state.
            input_ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            # .to() is a no-op on a CPU: the same tensors as ever there
            input_ids, mask = input_ids.to(device), mask.to(device)
            hidden = body(input_ids=input_ids, attention_mask=mask,
                          use_cache=False).last_hidden_state.float()
            if pooling == "mean":
                pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            else:  # "last": the last real token, which has attended to the whole text
                pooled = hidden[torch.arange(len(batch), device=device), mask.sum(1) - 1]
            out[batch] = pooled.to(out.device)
    return out


@dataclass(frozen=True)
class Head:
    """A saved head, read and checked: a linear layer over the pooled features."""
    path: Path
    labels: tuple[Label, ...]      # by class index
    pooling: str
    max_seq_length: int
    hidden_size: int
    weight: torch.Tensor           # [num_labels, hidden_size] fp32
    bias: torch.Tensor             # [num_labels] fp32

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the labels for features x [n, hidden_size]: [n, num_labels]."""
        import torch

        return torch.softmax(x @ self.weight.T + self.bias, dim=-1)


def write_head(head_dir: str | Path, *, weight: torch.Tensor, bias: torch.Tensor,
               labels: list[Label], pooling: str, max_seq_length: int,
               base_fingerprint: str, feature_precision: str = "fp32") -> Path:
    """Saves a head (see the module docstring for the files); returns the directory."""
    from safetensors.torch import save_file

    d = Path(head_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(d / HEAD_FILE))
    config = {"method": METHOD, "id2label": {str(i): label for i, label in enumerate(labels)},
              "num_labels": len(labels), "pooling": pooling, "hidden_size": int(weight.shape[1]),
              "max_seq_length": max_seq_length, "base_model_fingerprint": base_fingerprint,
              "feature_precision": feature_precision}
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return d


def read_head(head_dir: str | Path, base_fingerprint: str, hidden_size: int | None = None) -> Head:
    """Reads a head for the base model with fingerprint `base_fingerprint` (and, when given, the
    body's hidden size).

    CLASSIFIER_BASE_MODEL_MISMATCH when it was trained on another base model,
    CLASSIFIER_INVALID when the directory is not a well-formed head. The base model is checked
    before the tensors are read: a head for another model is refused without loading it.
    """
    d = Path(head_dir)

    def bad(problem: str) -> TunewireError:
        return TunewireError(R.CLASSIFIER_INVALID, f"{d}: {problem}")

    try:
        config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad(f"no {CONFIG_FILE}; not a classifier head") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"{CONFIG_FILE} is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise bad(f"{CONFIG_FILE} is not a JSON object")
    if config.get("method") != METHOD:
        raise bad(f"method is {config.get('method')!r}, not {METHOD!r}")
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise bad("id2label must be a non-empty object")
    try:
        labels = tuple(id2label[str(i)] for i in range(len(id2label)))
    except KeyError:
        raise bad("id2label keys must be 0, 1, ... without gaps") from None
    if any(isinstance(x, bool) or not isinstance(x, (str, int)) for x in labels):
        raise bad("labels must be strings or integers")
    if config.get("num_labels", len(labels)) != len(labels):
        raise bad(f"num_labels is {config.get('num_labels')} but id2label has {len(labels)}")
    if config.get("pooling") not in POOLINGS:
        raise bad(f"pooling must be one of {POOLINGS}")
    for key in ("hidden_size", "max_seq_length"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"{key} must be a positive integer")
    if not isinstance(config.get("base_model_fingerprint"), str):
        raise bad("base_model_fingerprint is missing")

    if config["base_model_fingerprint"] != base_fingerprint:
        raise TunewireError(R.CLASSIFIER_BASE_MODEL_MISMATCH,
                            f"{d} was trained on another base model than the one it is "
                            f"applied to (fingerprints differ)")
    if hidden_size is not None:
        check_hidden_size(config["hidden_size"], hidden_size, d)

    weight, bias = _read_tensors(d, len(labels), config["hidden_size"], bad)
    return Head(path=d, labels=labels, pooling=config["pooling"],
                max_seq_length=config["max_seq_length"], hidden_size=config["hidden_size"],
                weight=weight, bias=bias)


def predict(head_dir: str | Path, base_model: str | Path, texts: Sequence[str], *,
            device="cpu") -> list[tuple[Label, list[float]]]:
    """Classifies `texts` with a saved head on `base_model`: (label, probabilities by index).

    The reference, for a script or a test: it loads the tokenizer and the body (on `device`, as
    load_feature_body takes it; fp32 on the default CPU) on every call
    (serving_service/classify.py keeps them). Raises CLASSIFIER_BASE_MODEL_MISMATCH when the head was trained
    on another base model or is malformed, ValueError for a text that has no tokens.
    """
    if not texts:
        return []
    head = read_head(head_dir, base_model_fingerprint(base_model))
    tokenizer = load_tokenizer(base_model)
    body = load_feature_body(base_model, device)
    check_hidden_size(head.hidden_size, int(body.config.hidden_size), head_dir)
    ids, _ = encode(tokenizer, list(texts), head.max_seq_length,
                    no_tokens=lambda i: ValueError(f"text {i} has no tokens"))
    probs = head.probabilities(pooled_features(body, ids, pad_id(tokenizer), head.pooling))
    return [(head.labels[int(p.argmax())], p.tolist()) for p in probs]


def check_hidden_size(head_hidden: int, body_hidden: int, where: str | Path) -> None:
    # The fingerprint covers the model's config, so this fails only for a hand-edited head; the
    # matrix product would fail later anyway, with a less useful message.
    if head_hidden != body_hidden:
        raise TunewireError(R.CLASSIFIER_BASE_MODEL_MISMATCH,
                            f"{where} expects hidden size {head_hidden}, the base model "
                            f"has {body_hidden}")


def _read_tensors(d: Path, num_labels: int, hidden: int,
                  bad: Callable[[str], TunewireError]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    if not (d / HEAD_FILE).is_file():
        raise bad(f"no {HEAD_FILE}")
    try:
        tensors = load_file(str(d / HEAD_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise bad(f"{HEAD_FILE} is unreadable: {type(e).__name__}: {e}") from None
    shapes = {"weight": (num_labels, hidden), "bias": (num_labels,)}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != shapes:
        raise bad(f"{HEAD_FILE} holds {got}, expected {shapes}")
    if not all(t.is_floating_point() for t in tensors.values()):
        raise bad(f"{HEAD_FILE} tensors must be floating point")
    return tensors["weight"].to(torch.float32), tensors["bias"].to(torch.float32)
