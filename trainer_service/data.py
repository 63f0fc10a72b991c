"""Training data: read a JSONL file, check it, tokenize with completion-only labels, pad batches.

Each line of the file is one example, in one of two shapes:

    {"prompt": "Extract the person as JSON: ...", "completion": "{\"name\": ...}"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Only the completion (or the last assistant turn) is trained on; the prompt is context. The
tokenization copies what serving feeds the model for the same request, so the adapter learns on
exactly the token sequences it will see:

- prompt/completion: the prompt is `tokenizer(prompt).input_ids` (with the tokenizer's default
  special tokens, e.g. BOS), as vLLM's completions endpoint encodes a raw prompt; the completion
  is encoded without special tokens and followed by EOS, which is labelled so the model learns
  to stop.
- messages: the chat template renders the conversation to text, which is encoded without special
  tokens (the template writes its own), as vLLM's chat endpoint does. Labels start after the
  generation prompt of the last turn and end with the end-of-turn token; whatever the template
  writes after it (e.g. a newline) is never generated, so it is cut off.

    examples = load_examples("train.jsonl")
    rows, stats = tokenize_dataset(examples, tokenizer, max_seq_length=512)
    batch = collate(rows[:8], pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from tunewire.errors import JobFailure

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def _invalid(line: int, message: str) -> JobFailure:
    return JobFailure("DATASET_INVALID", f"training data line {line}: {message}", user_error=True)


def _check_row(row: object, line: int) -> None:
    """Raises DATASET_INVALID naming the line and the field if `row` is not a usable example."""
    if not isinstance(row, dict):
        raise _invalid(line, f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row and ("prompt" in row or "completion" in row):
        raise _invalid(line, "field messages: give either messages or prompt/completion, not both")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _invalid(line, "field messages: must be a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            where = f"field messages[{i}]"
            if not isinstance(m, dict):
                raise _invalid(line, f"{where}: must be an object with role and content")
            if not isinstance(m.get("role"), str) or not m["role"]:
                raise _invalid(line, f"{where}.role: must be a non-empty string")
            if not isinstance(m.get("content"), str):
                raise _invalid(line, f"{where}.content: must be a string")
        if msgs[-1]["role"] != "assistant":
            raise _invalid(line, f"field messages[{len(msgs) - 1}].role: the last message must be "
                                 f"the assistant's (the one to learn), not {msgs[-1]['role']!r}")
        if not msgs[-1]["content"]:
            raise _invalid(line, f"field messages[{len(msgs) - 1}].content: must not be empty")
        return
    for name in ("prompt", "completion"):
        if name not in row:
            raise _invalid(line, f"field {name}: is missing (each line needs prompt and "
                                 f"completion, or messages)")
        if not isinstance(row[name], str):
            raise _invalid(line, f"field {name}: must be a string, got {type(row[name]).__name__}")
    if not row["completion"]:
        raise _invalid(line, "field completion: must not be empty")


def _prescan(path: Path) -> int:
    """Checks every line with json.loads so errors name a line; returns the number of examples.

    `datasets` reports malformed JSON without a usable line number and fills missing fields with
    None, so the exact checks happen here, on the raw rows.
    """
    count = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # datasets skips blank lines too, so rows still map to lines
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _invalid(line_no, f"not valid JSON ({e.msg} at column {e.colno})"
                                   ) from None
                _check_row(row, line_no)
                count += 1
    except UnicodeDecodeError as e:
        raise JobFailure("DATASET_INVALID", f"training data is not UTF-8 text: {e}",
                         user_error=True) from None
    return count


def load_examples(path: str) -> list[dict]:
    """Reads and checks a JSONL file; returns rows as {prompt, completion} or {messages} dicts."""
    p = Path(path)
    if not p.is_file():
        raise JobFailure("DATASET_NOT_FOUND", f"no training data file at {path}", user_error=True)
    if _prescan(p) == 0:
        raise JobFailure("DATASET_EMPTY", f"training data {path} has no examples", user_error=True)

    import datasets  # heavy import; only the worker needs it

    # A private cache directory: the shared HF cache would keep an Arrow copy of every job's data
    # and could serve a stale copy when a file is rewritten in place.
    with tempfile.TemporaryDirectory(prefix="tunewire-data-") as cache:
        try:
            ds = datasets.load_dataset("json", data_files=str(p), split="train", cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - e.g. a field whose type changes between lines
            raise JobFailure("DATASET_INVALID", f"training data could not be loaded: "
                             f"{type(e).__name__}: {e}", user_error=True) from None
        # Arrow gives every row every column (None where a line lacked it); keep the row's shape.
        examples = []
        for row in ds:
            if row.get("messages") is not None:
                examples.append({"messages": [{"role": m["role"], "content": m["content"]}
                                              for m in row["messages"]]})
            else:
                examples.append({"prompt": row["prompt"], "completion": row["completion"]})
    return examples


def _encode(example: dict, tokenizer, eos_ids: Collection[int]) -> tuple[list[int], list[int]]:
    """Full (untruncated) input ids and labels of one checked example."""
    eos = tokenizer.eos_token_id
    if "messages" in example:
        msgs = example["messages"]
        prefix_text = tokenizer.apply_chat_template(msgs[:-1], tokenize=False,
                                                    add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prefix = tokenizer(prefix_text, add_special_tokens=False).input_ids
        full = tokenizer(full_text, add_special_tokens=False).input_ids
        if full[:len(prefix)] != prefix:
            raise JobFailure("DATASET_INVALID", "the chat template renders the conversation "
                             "without the generation prompt as a prefix, so the assistant turn "
                             "cannot be told apart; use prompt/completion rows instead",
                             user_error=True)
        answer = full[len(prefix):]
        end = next((i for i, t in enumerate(answer) if t in eos_ids), None)
        # Keep the answer through its end-of-turn token; the template's text after it is never
        # generated. A template that does not end turns with EOS gets one, so the model stops.
        answer = answer[:end + 1] if end is not None else answer + [eos]
        return prefix + answer, [IGNORE] * len(prefix) + answer
    prompt = tokenizer(example["prompt"]).input_ids
    completion = tokenizer(example["completion"], add_special_tokens=False).input_ids + [eos]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _has_labels(labels: list[int]) -> bool:
    # Position 0 is never predicted (nothing precedes it), so its label cannot train anything.
    return any(t != IGNORE for t in labels[1:])


def tokenize_example(example: dict, tokenizer, max_seq_length: int, *,
                     eos_ids: Collection[int] | None = None) -> dict[str, list[int]]:
    """Encodes one example as {input_ids, labels}, labels IGNORE (-100) except on the completion.

    Keeps the first `max_seq_length` tokens. `eos_ids` are the tokens that end an assistant turn
    (the tokenizer's EOS is always one).
    """
    ids, labels = _encode(example, tokenizer, _eos_set(tokenizer, eos_ids))
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length]}


def _eos_set(tokenizer, eos_ids: Collection[int] | None) -> set[int]:
    if tokenizer.eos_token_id is None:
        raise JobFailure("BASE_MODEL_INVALID", "the tokenizer has no EOS token", user_error=True)
    return set(eos_ids or ()) | {tokenizer.eos_token_id}


@dataclass(frozen=True)
class TokenStats:
    examples: int       # examples kept for training
    truncated: int      # of those, how many lost tokens to max_seq_length
    dropped: int        # examples with no labelled token left after truncation (not trained on)
    tokens: int         # tokens in the kept examples
    label_tokens: int   # of those, how many carry loss


def tokenize_dataset(examples: list[dict], tokenizer, max_seq_length: int, *,
                     eos_ids: Collection[int] | None = None) -> tuple[list[dict], TokenStats]:
    """Tokenizes every example, drops those left without labels, and counts what was cut."""
    eos = _eos_set(tokenizer, eos_ids)
    rows, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, labels = _encode(ex, tokenizer, eos)
        cut = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if not _has_labels(labels):
            dropped += 1
            continue
        truncated += cut
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise JobFailure("DATASET_EMPTY", f"none of the {dropped} examples has a completion token "
                         f"within max_seq_length={max_seq_length}, leaving nothing to train on",
                         user_error=True)
    stats = TokenStats(examples=len(rows), truncated=truncated, dropped=dropped,
                       tokens=sum(len(r["input_ids"]) for r in rows),
                       label_tokens=sum(sum(t != IGNORE for t in r["labels"][1:]) for r in rows))
    return rows, stats


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch to its longest row: input_ids, labels (IGNORE on pads), attention_mask."""
    width = max(len(r["input_ids"]) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
