"""Packing several examples per sequence, collation into tensors, and the model's inputs.

A packed row holds whole examples back to back. Its ``position_ids`` restart at 0 for each
example, and the label of each example's first token is IGNORE_INDEX (it is not predicted from
the previous example). The model is then called with ``position_ids`` and no attention mask
(`model_inputs`): transformers 5 reads the document boundaries from the restarting positions
(masking_utils.find_packed_sequence_indices). With flash-attention it runs the varlen kernel on
them; with sdpa, eager and flex it builds a block-diagonal causal mask, so no token attends
across examples either way (the padded tail forms a block of its own, with no labels).
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from fsdp_qlora.data.sft import IGNORE_INDEX, pad_batch

PACK_WINDOW = 1000  # examples packed together (best-fit decreasing within each window)


def pack_rows(batch: dict[str, list], context_length: int) -> dict[str, list]:
    """A batched datasets.map function: tokenized examples -> packed rows of at most context_length.

    Best-fit decreasing within the batch: longest example first, each into the fullest row it
    still fits. Within a row, examples keep their dataset order. Deterministic.
    """
    lengths = [len(ids) for ids in batch["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = context_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "num_examples": [], "length": []}
    for members in rows:
        members.sort()
        ids, labels, positions = [], [], []
        for i in members:
            ids += batch["input_ids"][i]
            labels += [IGNORE_INDEX] + list(batch["labels"][i][1:])
            positions += list(range(lengths[i]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["num_examples"].append(len(members))
        out["length"].append(len(ids))
    return out


def pad_packed_batch(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """pad_batch plus position_ids; the padded tail gets positions 0.. (a block of its own)."""
    batch = pad_batch(rows, pad_id)
    longest = batch["input_ids"].shape[1]
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["position_ids"])
        position_ids[i, :length] = torch.tensor(row["position_ids"])
        position_ids[i, length:] = torch.arange(longest - length)
    batch["position_ids"] = position_ids
    return batch


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (with position_ids) or plain examples -> a dict of long tensors."""
    if rows and "position_ids" in rows[0]:
        return pad_packed_batch(rows, pad_id)
    return pad_batch(rows, pad_id)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The forward's keyword arguments for a batch.

    Packed batches: position_ids and no attention mask (and no KV cache), which makes transformers restrict
    attention to each example (see the module docstring). Their ``attention_mask`` (1 on real
    tokens) stays in the batch for token counting only. Padded batches: the attention mask.
    """
    # No KV cache: transformers only reads packed documents from position_ids without one.
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None,
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def rows_at(dataset: Any, indices: list[int]) -> list[dict[str, list[int]]]:
    """The training columns of `dataset` (a 🤗 Dataset) at `indices`, as one dict per row."""
    columns = dataset[indices]
    keys = [k for k in ("input_ids", "labels", "position_ids") if k in columns]
    return [{k: columns[k][i] for k in keys} for i in range(len(indices))]
