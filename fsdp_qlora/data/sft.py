"""Supervised fine-tuning data: alpaca-style prompts, loss on the response only, sharded batches.

The training loop uses `fsdp_qlora.data.pipeline.build_train_data` (formats, caching, packing,
the resumable sampler: docs/data.md). This module keeps the alpaca prompt, the padding collator
and the original per-epoch DataLoader, whose batches the pipeline reproduces by default.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fsdp_qlora.data.make_sample_data import SAMPLE_DATASET_PATH
from fsdp_qlora.errors import ConfigError

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: no loss on these positions
REQUIRED_COLUMNS = ("instruction", "output")

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca prompt; the Input section only when there is an input."""
    if input_text:
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


def load_instruction_dataset(dataset: str) -> datasets.Dataset:
    """'sample' (the bundled file), a local .json/.jsonl file, or a hub dataset id (train split)."""
    if dataset == "sample":
        loaded = _load_json(SAMPLE_DATASET_PATH)
    elif dataset.endswith((".json", ".jsonl")):
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise ConfigError(f"dataset file {path} does not exist: pass an existing .json/.jsonl file, "
                             "'sample' for the bundled data, or a hub dataset id to --dataset")
        loaded = _load_json(path)
    else:
        loaded = datasets.load_dataset(dataset, split="train")
    missing = [column for column in REQUIRED_COLUMNS if column not in loaded.column_names]
    if missing:
        raise ConfigError(f"dataset {dataset!r} lacks column(s) {', '.join(missing)}; it has "
                         f"{', '.join(loaded.column_names)}: provide instruction/output (and optional input) "
                         "columns, e.g. rename them with datasets' rename_column")
    return loaded


def _load_json(path: Path) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=str(path), split="train")


def tokenize_example(example: dict[str, Any], tokenizer, context_length: int) -> dict[str, list[int]]:
    """bos + prompt + response + eos, truncated; labels mask bos and prompt with IGNORE_INDEX.

    Prompt and response are tokenized separately so the mask boundary falls exactly
    between them; special tokens are added by hand because tokenizers disagree on
    whether they add bos/eos themselves.
    """
    prompt = format_prompt(example["instruction"], example.get("input") or "")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:context_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:context_length]
    return {"input_ids": input_ids, "labels": labels}


def build_dataloader(dataset: datasets.Dataset, tokenizer, context_length: int, batch_size: int,
                     rank: int, world_size: int, seed: int, epoch: int = 0) -> DataLoader:
    """This rank's batches for one epoch: a seeded shuffle, split disjointly across ranks.

    The tail that does not divide by world_size is dropped so every rank runs the same
    number of steps (a rank with an extra batch would hang the others' collectives).
    """
    tokenized = dataset.map(tokenize_example, fn_kwargs={"tokenizer": tokenizer, "context_length": context_length},
                            remove_columns=dataset.column_names, desc="tokenizing")
    sampler = DistributedSampler(tokenized, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # An own generator: a DataLoader iterator otherwise draws its base seed from the global
    # torch RNG, which also drives dropout, and a resumed run would draw at another point.
    return DataLoader(tokenized, batch_size=batch_size, sampler=sampler,
                      collate_fn=partial(pad_batch, pad_id=pad_id), generator=torch.Generator().manual_seed(seed))


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: pad_id in input_ids, IGNORE_INDEX in labels, 0 in attention_mask."""
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.tensor(row["input_ids"])
        labels[i, :length] = torch.tensor(row["labels"])
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
