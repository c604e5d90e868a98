"""The bundled dataset and the SFT pipeline: prompt masking, sharding across ranks, seeded shuffles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fsdp_qlora.data.make_sample_data import SAMPLE_DATASET_PATH, make_examples
from fsdp_qlora.data.sft import (IGNORE_INDEX, build_dataloader, format_prompt, load_instruction_dataset,
                                 tokenize_example)
from fsdp_qlora.model.tiny_llama import ensure_tiny_llama

CONTEXT_LENGTH = 256


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(ensure_tiny_llama(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def sample():
    return load_instruction_dataset("sample")


def _examples_seen(loader) -> list[tuple[int, ...]]:
    """Each batch row's unpadded token ids: identifies its example (the sample has no duplicates)."""
    return [tuple(ids[mask.bool()].tolist()) for batch in loader
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_bundled_file_is_what_the_generator_makes():
    rows = [json.loads(line) for line in SAMPLE_DATASET_PATH.read_text().splitlines()]
    assert rows == make_examples()
    assert len({json.dumps(row, sort_keys=True) for row in rows}) == len(rows) >= 300


def test_sample_examples_are_short(sample, tokenizer):
    lengths = [len(tokenize_example(example, tokenizer, CONTEXT_LENGTH)["input_ids"]) for example in sample]
    assert max(lengths) < 100


def test_prompt_omits_empty_input():
    assert format_prompt("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert format_prompt("Sort.", "b a") == "### Instruction:\nSort.\n\n### Input:\nb a\n\n### Response:\n"


@pytest.mark.parametrize("example", [
    {"instruction": "What is 2 + 3?", "input": "", "output": "5"},
    {"instruction": "Reverse the order of these words.", "input": "cat dog sun", "output": "sun dog cat"},
])
def test_labels_mask_exactly_bos_and_prompt(example, tokenizer):
    tokenized = tokenize_example(example, tokenizer, CONTEXT_LENGTH)
    input_ids, labels = tokenized["input_ids"], tokenized["labels"]
    prompt_length = 1 + len(tokenizer(format_prompt(example["instruction"], example["input"]),
                                      add_special_tokens=False).input_ids)
    assert input_ids[0] == tokenizer.bos_token_id and input_ids[-1] == tokenizer.eos_token_id
    assert len(labels) == len(input_ids)
    for position, (token, label) in enumerate(zip(input_ids, labels)):
        expected = IGNORE_INDEX if position < prompt_length else token
        assert label == expected, f"position {position}"
    assert tokenizer.decode(input_ids[prompt_length:-1]) == example["output"]


def test_truncates_to_context_length(tokenizer):
    example = {"instruction": "Repeat the word cat 5 times.", "input": "", "output": "cat cat cat cat cat"}
    tokenized = tokenize_example(example, tokenizer, 8)
    assert len(tokenized["input_ids"]) == len(tokenized["labels"]) == 8


def test_batches_are_padded_long_tensors(sample, tokenizer):
    batch = next(iter(build_dataloader(sample, tokenizer, CONTEXT_LENGTH, 8, rank=0, world_size=1, seed=0)))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(tensor.dtype == torch.long and tensor.shape == batch["input_ids"].shape for tensor in batch.values())
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    lengths = batch["attention_mask"].sum(1, keepdim=True)
    right_padded = torch.arange(batch["attention_mask"].shape[1]) < lengths
    assert torch.equal(batch["attention_mask"].bool(), right_padded)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_slices_covering_the_dataset(sample, tokenizer, world_size):
    loaders = [build_dataloader(sample, tokenizer, CONTEXT_LENGTH, 4, rank, world_size, seed=0)
               for rank in range(world_size)]
    per_rank = [_examples_seen(loader) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1  # equal step counts, or collectives hang
    seen = [example for examples in per_rank for example in examples]
    assert len(seen) == len(set(seen)) == len(sample) - len(sample) % world_size


def test_shuffle_is_deterministic_per_seed_and_epoch(sample, tokenizer):
    def order(seed: int, epoch: int) -> list[tuple[int, ...]]:
        return _examples_seen(build_dataloader(sample, tokenizer, CONTEXT_LENGTH, 4, 0, 2, seed, epoch=epoch))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert set(order(0, 0)) != set(order(0, 1))  # each epoch re-deals examples across ranks


def test_missing_columns_error_names_available_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    with pytest.raises(ValueError, match="instruction, output") as error:
        load_instruction_dataset(str(path))
    assert "prompt" in str(error.value) and "completion" in str(error.value)


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="does not exist") as error:
        load_instruction_dataset(str(missing))
    assert str(missing) in str(error.value)


def test_local_json_file_loads(tmp_path: Path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}]))
    assert load_instruction_dataset(str(path))[0]["output"] == "hi"
