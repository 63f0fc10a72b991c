"""Tokenized rows to a training batch: right-padded to the batch's longest row (dynamic padding).

    batch = collate(rows[:8], pad_id=tokenizer.pad_token_id)   # input_ids, labels, attention_mask

Packed rows (hyperparameters.packing) have their own collate, trainer_service.packing. The batch
is built on the CPU; `common.Compute.batch` moves it to the device where the loss is taken.
`labelled_tokens` and `real_tokens` count from the rows (plain or packed) without a tensor.
"""

from __future__ import annotations

import torch

from trainer_service.data_tokens import IGNORE


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch to its longest row: input_ids, labels (IGNORE on pads), attention_mask."""
    return {"input_ids": right_pad([r["input_ids"] for r in batch], pad_id),
            "labels": right_pad([r["labels"] for r in batch], IGNORE),
            "attention_mask": right_pad([[1] * len(r["input_ids"]) for r in batch], 0)}


def right_pad(rows: list[list[int]], fill: int | None = None) -> torch.Tensor:
    """Rows of ids as one [rows, longest] long tensor, each row continued by `fill`, or with
    fill None by 0, 1, 2, ... (position ids that restart over the padding)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + ([fill] * (width - len(r)) if fill is not None
                              else list(range(width - len(r)))) for r in rows], dtype=torch.long)


def labelled_tokens(rows: list[dict]) -> int:
    """Tokens that carry loss in tokenized (or packed) rows: token t predicts label t + 1, so a
    row's first label never counts (common.labelled_loss's targets = labels[:, 1:])."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows)


def real_tokens(rows: list[dict]) -> int:
    """Tokens that are not padding (throughput counts these)."""
    return sum(len(r["input_ids"]) for r in rows)
