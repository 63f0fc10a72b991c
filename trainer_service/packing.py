"""Sequence packing (`hyperparameters.packing`): several short examples share one training row.

`pack` fills rows of at most max_seq_length tokens with whole examples (best-fit: each example
goes into the fullest row it still fits in, else a new row); every example keeps its own
`position_ids`, restarting at 0. `collate_packed` pads a batch of such rows and passes NO
attention mask: transformers 5 (`masking_utils.find_packed_sequence_indices`, called by
`create_causal_mask` when attention_mask is None and there is no cache) then splits each row into
segments wherever position_ids do not go up by exactly 1 and builds a block-diagonal causal mask,
so an example never attends to another one in its row. The padding at the end of a row restarts
at 0 too, making it a segment of its own that no real token sees.

Token t predicts t + 1, so the last token of one example would be trained to predict the first
token of the next: every example's first label is IGNORE (the first label never carries loss
when unpacked either, so packed and unpacked losses are the same).

    rows = pack(rows, max_seq_length=512)
    loss = packed_loss(model, collate_packed(rows[:8], pad_id))
"""

from __future__ import annotations

import bisect

import torch

from trainer_service import common
from trainer_service.data_batches import right_pad
from trainer_service.data_tokens import IGNORE


def pack(rows: list[dict], max_seq_length: int) -> list[dict]:
    """Packs tokenized rows (input_ids, labels) into rows of <= max_seq_length tokens with
    input_ids, labels and position_ids. Deterministic; examples keep their order within a row."""
    bins: list[list[dict]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted: best fit by bisect
    for r in rows:
        n = len(r["input_ids"])
        if not 0 < n <= max_seq_length:
            raise ValueError(f"a row of {n} tokens cannot be packed into {max_seq_length}")
        i = bisect.bisect_left(room, (n, -1))  # the row with the least room that still fits
        if i == len(room):
            bins.append([])
            free, b = max_seq_length, len(bins) - 1
        else:
            free, b = room.pop(i)
        bins[b].append(r)
        if free - n:
            bisect.insort(room, (free - n, b))
    packed = []
    for members in bins:
        ids, labels, pos = [], [], []
        for r in members:
            ids += r["input_ids"]
            labels += [IGNORE, *r["labels"][1:]]
            pos += range(len(r["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


def collate_packed(batch: list[dict], pad_id: int) -> dict:
    """Right-pads packed rows to the longest: input_ids, labels (IGNORE on pads), position_ids
    (0, 1, ... again over the padding), attention_mask None (see the module doc) and num_tokens
    (the real tokens, for throughput)."""
    return {"input_ids": right_pad([r["input_ids"] for r in batch], pad_id),
            "labels": right_pad([r["labels"] for r in batch], IGNORE),
            "position_ids": right_pad([r["position_ids"] for r in batch]),  # 0, 1, ... over pads
            "attention_mask": None, "num_tokens": sum(len(r["input_ids"]) for r in batch)}


def packed_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """`common.completion_loss` for a packed batch: the model gets position_ids and no mask."""
    return common.labelled_loss(model, batch["labels"], reduction, input_ids=batch["input_ids"],
                                position_ids=batch["position_ids"], attention_mask=None)
