"""The bundled dataset and the SFT pipeline: prompt masking, sharding across ranks, seeded shuffles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fsdp_qlora.data.make_sample_data import SAMPLE_DATASET_PATH, make_examples
from fsdp_qlora.data.sft import (
    IGNORE_INDEX,
    build_dataloader,
    format_prompt,
    load_instruction_dataset,
    tokenize_example,
)
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


# -- the pipeline: build_train_data (formats, file types, errors, the resumable sampler) ------

import dataclasses  # noqa: E402

import datasets  # noqa: E402

from fsdp_qlora.config import TrainConfig  # noqa: E402
from fsdp_qlora.data.pipeline import build_train_data  # noqa: E402
from fsdp_qlora.errors import ConfigError  # noqa: E402

ROWS = [{"instruction": f"Repeat the word {w} {n} times.", "input": "", "output": " ".join([w] * n)}
        for w in ("cat", "dog", "sun", "tree", "book") for n in (2, 3, 4)]
CHAT = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
         {"role": "assistant", "content": "It is 8."}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]]


def _cfg(dataset: str, **overrides) -> TrainConfig:
    return TrainConfig(**{"dataset": dataset, "context_length": CONTEXT_LENGTH, "batch_size": 2, **overrides}).validate()


def _write(path: Path, rows: list[dict]) -> Path:
    """rows as the file type `path`'s suffix names (or a save_to_disk directory without one)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".txt":
        path.write_text("".join(row["text"] + "\n" for row in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def _all_rows(data) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input_ids, labels) of every row of epoch 0, unpadded, in order."""
    rows = []
    for batch in (next(iter_) for iter_ in [data.batches()] for _ in range(data.micro_batches_per_epoch)):
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            rows.append((tuple(ids[mask.bool()].tolist()), tuple(labels[mask.bool()].tolist())))
    return rows


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data.csv", "saved"])
def test_instruction_files_of_every_type_give_the_same_examples(tmp_path, tokenizer, name):
    data = build_train_data(_cfg(str(_write(tmp_path / name, ROWS))), tokenizer)
    expected = {tuple(tokenize_example(row, tokenizer, CONTEXT_LENGTH)["input_ids"]) for row in ROWS}
    assert data.format_name == "instruction"
    assert {ids for ids, _ in _all_rows(data)} == expected


def test_text_files_are_completion_style(tmp_path, tokenizer):
    lines = ["the cat sat on the mat", "a dog ran", "the sun is a star", "birds sing"]
    data = build_train_data(_cfg(str(_write(tmp_path / "corpus.txt", [{"text": t} for t in lines]))), tokenizer)
    assert data.format_name == "text"
    rows = _all_rows(data)
    assert {tokenizer.decode(ids[1:-1]) for ids, _ in rows} == set(lines)
    for ids, labels in rows:  # loss on everything but bos: the text and eos
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert labels == (IGNORE_INDEX, *ids[1:])


def test_column_names_are_configurable(tmp_path, tokenizer):
    renamed = [{"prompt": r["instruction"], "answer": r["output"]} for r in ROWS]
    cfg = _cfg(str(_write(tmp_path / "d.jsonl", renamed)), instruction_column="prompt", output_column="answer")
    data = build_train_data(cfg, tokenizer)
    expected = {tuple(tokenize_example(row, tokenizer, CONTEXT_LENGTH)["input_ids"]) for row in ROWS}
    assert {ids for ids, _ in _all_rows(data)} == expected


def test_chat_labels_exactly_the_assistant_turns(tmp_path, tokenizer):
    """Token by token, against the template rebuilt by hand: role headers, system and user turns
    masked; assistant content + eos + newline labelled."""
    data = build_train_data(_cfg(str(_write(tmp_path / "chat.jsonl", [{"messages": m} for m in CHAT]))), tokenizer)
    assert data.format_name == "chat"
    by_ids = dict(_all_rows(data))
    for messages in CHAT:
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
        for message in messages:
            header = tokenizer(f"<|{message['role']}|>\n", add_special_tokens=False).input_ids
            body = tokenizer(message["content"] + tokenizer.eos_token + "\n", add_special_tokens=False).input_ids
            ids += header + body
            labels += [IGNORE_INDEX] * len(header) + (body if message["role"] == "assistant" else
                                                      [IGNORE_INDEX] * len(body))
        assert tuple(ids) in by_ids, tokenizer.decode(ids)
        got = by_ids[tuple(ids)]
        for position, (label, expected) in enumerate(zip(got, labels)):
            assert label == expected, f"position {position}: {tokenizer.decode(ids[position])!r}"
        assert len(got) == len(labels)


def test_format_is_detected_or_forced(tmp_path, tokenizer):
    both = [{"text": "a b c", "instruction": "Say a.", "output": "a"}] * 4
    path = str(_write(tmp_path / "both.jsonl", both))
    assert build_train_data(_cfg(path), tokenizer).format_name == "instruction"
    assert build_train_data(_cfg(path, dataset_format="text"), tokenizer).format_name == "text"


def test_missing_columns_name_the_available_ones_and_the_flags(tmp_path, tokenizer):
    path = str(_write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}]))
    with pytest.raises(ConfigError, match="--instruction-column") as error:
        build_train_data(_cfg(path), tokenizer)
    assert "prompt, completion" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="lacks column.*messages.*--dataset-format chat.*--messages-column"):
        build_train_data(_cfg(path, dataset_format="chat"), tokenizer)


def test_too_long_examples_are_counted_then_truncated_or_dropped(tmp_path, tokenizer, capsys):
    rows = ROWS + [{"instruction": "Write a lot.", "input": "", "output": " ".join(["cat"] * 60)}]
    path = str(_write(tmp_path / "d.jsonl", rows))
    limit = 40
    truncated = build_train_data(_cfg(path, context_length=limit), tokenizer)
    assert truncated.reports["train"]["too_long"] == 1 and len(truncated.rows) == len(rows)
    assert "1 longer than --context-length 40 (truncated" in capsys.readouterr().out
    assert max(len(ids) for ids, _ in _all_rows(truncated)) == limit
    dropped = build_train_data(_cfg(path, context_length=limit, truncation="drop"), tokenizer)
    assert len(dropped.rows) == len(rows) - 1
    assert "1 longer than --context-length 40 (dropped" in capsys.readouterr().out


def test_empty_after_filtering_is_an_error(tmp_path, tokenizer):
    path = str(_write(tmp_path / "d.jsonl", ROWS))
    with pytest.raises(ConfigError, match="empty after filtering.*--context-length"):
        build_train_data(_cfg(path, context_length=8, truncation="drop"), tokenizer)


def test_eval_split_of_a_local_file_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="one split.*--eval-fraction"):
        build_train_data(_cfg(str(_write(tmp_path / "d.jsonl", ROWS)), eval_split="test"), tokenizer)


def test_eval_fraction_holds_out_disjoint_examples(sample, tokenizer):
    data = build_train_data(_cfg("sample", eval_fraction=0.1), tokenizer)
    assert len(data.eval.rows) == 40 and len(data.rows) == 360
    held = {tuple(r) for r in data.eval.rows["input_ids"]}
    assert not held & {tuple(r) for r in data.rows["input_ids"]}


def test_default_batches_are_those_of_the_previous_dataloader(sample, tokenizer):
    """The pipeline reproduces the DistributedSampler + DataLoader batches exactly (same order)."""
    cfg = dataclasses.replace(_cfg("sample"), batch_size=4)
    for rank in range(2):
        data = build_train_data(cfg, tokenizer, rank=rank, world_size=2)
        data.set_position(data.micro_batches_per_epoch - 3)  # the end of epoch 0, into epoch 1
        stream = data.batches()
        for epoch, skip in ((0, data.micro_batches_per_epoch - 3), (1, 0)):
            loader = list(build_dataloader(sample, tokenizer, CONTEXT_LENGTH, 4, rank, 2, cfg.seed, epoch=epoch))
            for expected in loader[skip:]:
                got = next(stream)
                assert got.keys() == expected.keys()
                assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_mid_epoch_continues_the_exact_order(sample, tokenizer):
    cfg = _cfg("sample", group_by_length=True)
    total = 250  # 2.5 epochs of 100 micro-batches on rank 1 of 2
    uninterrupted = build_train_data(cfg, tokenizer, rank=1, world_size=2).batches()
    reference = [next(uninterrupted)["input_ids"] for _ in range(total)]
    for stop in (37, 100, 163):
        first = build_train_data(cfg, tokenizer, rank=1, world_size=2)
        stream = first.batches()
        before = [next(stream)["input_ids"] for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = build_train_data(cfg, tokenizer, rank=1, world_size=2)
        resumed.load_state_dict(state)
        stream = resumed.batches()
        after = [next(stream)["input_ids"] for _ in range(total - stop)]
        assert all(torch.equal(a, b) for a, b in zip(before + after, reference, strict=True)), stop


def test_length_grouping_pads_less_and_covers_the_same_examples(sample, tokenizer):
    plain = build_train_data(_cfg("sample"), tokenizer)
    grouped = build_train_data(_cfg("sample", group_by_length=True), tokenizer)
    assert grouped.efficiency() > plain.efficiency() + 0.05
    assert sorted(sum(grouped.epoch_indices(0), [])) == sorted(sum(plain.epoch_indices(0), []))
    assert grouped.epoch_indices(0) != grouped.epoch_indices(1)


def test_streaming_is_deterministic_and_resumable(tmp_path, tokenizer):
    path = str(_write(tmp_path / "d.jsonl", ROWS))
    cfg = _cfg(path, dataset_streaming=True, max_steps=10)
    reference = build_train_data(cfg, tokenizer).batches()
    reference = [next(reference)["input_ids"] for _ in range(20)]  # 2.5 epochs of 8 batches
    assert not all(torch.equal(a, b) for a, b in zip(reference[:8], reference[8:16]))  # reshuffled per epoch
    resumed = build_train_data(cfg, tokenizer)
    resumed.load_state_dict({"micro_batches_consumed": 11, "epoch": 1})
    stream = resumed.batches()
    assert all(torch.equal(next(stream)["input_ids"], expected) for expected in reference[11:])


_GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})
MALFORMED = {  # file name: (content, what the one-line error must say)
    "broken.jsonl": ((_GOOD + "\n") * 2 + '{"instruction": "x", "output": \n' + _GOOD + "\n",
                     "line 3 is not valid JSON"),
    "broken.json": ("[\n" + _GOOD + ",\n" + _GOOD + ",,\n]\n", "line 3 is not valid JSON"),
    "broken.csv": ("instruction,input,output\nSay hi.,,hi\nSay yo.,,yo,extra\n", "line 3 has 4 fields, the header has 3"),
    "broken.parquet": ("PAR1 this is not parquet at all", "not a readable Parquet file"),
    "broken.txt": (b"a fine line\nbad \xff\xfe bytes\n", "line 2 is not UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_file_is_one_line_naming_the_file_and_line(tmp_path, tokenizer, name):
    content, expected = MALFORMED[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as error:
        build_train_data(_cfg(str(path)), tokenizer)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"dataset file {path}: ") and expected in message, message


def test_a_malformed_file_stops_train_py_before_weights_load(tmp_path):
    from tests.conftest import REPO, run_python, subprocess_env

    path = tmp_path / "broken.jsonl"
    path.write_text(MALFORMED["broken.jsonl"][0])
    proc = run_python(str(REPO / "train.py"), "--dataset", str(path), "--output-dir", str(tmp_path / "run"),
                      env=subprocess_env(tmp_path / "cache"), timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{path}: line 3 is not valid JSON" in errors[0]
    assert "adapters on" not in proc.stdout
