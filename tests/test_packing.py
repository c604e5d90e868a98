"""Packing: whole examples per row, positions restarting, and no attention across examples."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.packing import collate, model_inputs, pack_rows
from fsdp_qlora.data.pipeline import build_train_data
from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.model.tiny_llama import ensure_tiny_llama
from fsdp_qlora.train.loss import token_loss_sum

CONTEXT_LENGTH = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_llama(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def packed(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = TrainConfig(context_length=CONTEXT_LENGTH, batch_size=3, packing=True).validate()
    return build_train_data(cfg, tokenizer)


def _documents(batch: dict[str, torch.Tensor], row: int) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: where position_ids restart, up to the padding."""
    length = int(batch["attention_mask"][row].sum())
    starts = [i for i in range(length) if batch["position_ids"][row, i] == 0]
    return list(zip(starts, starts[1:] + [length]))


def test_pack_rows_keeps_every_example_whole():
    docs = [[1, 10 + i] + [7] * (i % 5) + [2] for i in range(23)]
    out = pack_rows({"input_ids": docs, "labels": docs}, context_length=12)
    assert max(map(len, out["input_ids"])) <= 12
    assert sum(out["num_examples"]) == len(docs)
    seen = []
    for ids, labels, positions in zip(out["input_ids"], out["labels"], out["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            seen.append(ids[start:end])
            assert positions[start:end] == list(range(end - start))
            assert labels[start] == IGNORE_INDEX  # never predicted from the previous example
            assert labels[start + 1:end] == ids[start + 1:end]
    assert sorted(seen) == sorted(docs)
    assert len(out["input_ids"]) <= sum(map(len, docs)) // 12 + 2  # best fit: few rows


def test_packed_batches_carry_positions_and_pad_into_a_block_of_their_own(packed):
    batch = next(packed.batches())
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert batch["input_ids"].shape[1] <= CONTEXT_LENGTH
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        tail = batch["position_ids"][row, length:]
        assert torch.equal(tail, torch.arange(len(tail)))
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    assert model_inputs(batch)["attention_mask"] is None
    assert packed.efficiency() > 0.9 and len(packed.rows) < 400 // 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_document_logits_equal_each_document_alone(packed, model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    batch = next(packed.batches())
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        checked = 0
        for row in range(batch["input_ids"].shape[0]):
            documents = _documents(batch, row)
            assert len(documents) > 1
            for start, end in documents:
                alone = model(input_ids=batch["input_ids"][row:row + 1, start:end], use_cache=False).logits[0]
                torch.testing.assert_close(logits[row, start:end], alone, rtol=0, atol=2e-5)
                checked += 1
    assert checked >= 6


def test_packed_loss_is_the_sum_of_the_documents_losses(packed, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = next(packed.batches())
    rows = [{"input_ids": batch["input_ids"][r, s:e].tolist(), "labels": batch["labels"][r, s:e].tolist()}
            for r in range(batch["input_ids"].shape[0]) for s, e in _documents(batch, r)]
    with torch.no_grad():
        together = token_loss_sum(model, batch)
        alone = token_loss_sum(model, collate(rows, pad_id=3))  # one padded batch, one example per row
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
