"""The eval set: split across ranks in order, every rank the same number of batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import datasets
import torch

from fsdp_qlora.data.packing import collate, rows_at
from fsdp_qlora.data.sft import IGNORE_INDEX


class EvalData:
    """The eval set split across ranks, in order. Every rank runs the same number of batches (the
    forward passes are collectives under FSDP): a rank short of rows repeats row 0 with no labels."""

    def __init__(self, rows: datasets.Dataset, batch_size: int, rank: int, world_size: int, pad_id: int):
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        per_rank = math.ceil(len(rows) / world_size)
        mine = list(range(rank, len(rows), world_size))
        self.indices = mine + [-1] * (per_rank - len(mine))  # -1: filler without labels

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            rows = rows_at(self.rows, [max(i, 0) for i in chunk])
            for row, index in zip(rows, chunk):
                if index < 0:
                    row["labels"] = [IGNORE_INDEX] * len(row["labels"])
            yield collate(rows, self.pad_id)
