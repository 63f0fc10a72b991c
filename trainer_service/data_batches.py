"""Tokenized rows to a training batch: right-padded to the batch's longest row (dynamic padding).

    batch = collate(rows[:8], pad_id=tokenizer.pad_token_id)   # input_ids, labels, attention_mask

Packed rows (hyperparameters.packing) have their own collate, trainer_service.packing.
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
