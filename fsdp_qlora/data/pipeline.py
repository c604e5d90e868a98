"""The data pipeline the training loop uses: `build_train_data(cfg, tokenizer, ...) -> TrainData`.

    data = build_train_data(cfg, tokenizer, env.rank, env.world_size, env.is_main, env.local_rank)
    data.set_position(state.micro_batches_consumed)   # or data.load_state_dict(saved)
    batches = data.batches()                          # endless: epoch after epoch
    next(batches) -> {"input_ids", "labels", "attention_mask"[, "position_ids" when packing]}
    data.state_dict()                                 # epoch + micro-batches consumed, for checkpoints
    data.eval                                         # EvalData or None; data.eval.batches()

Tokenization (and packing) runs once: on global rank 0 first, written to the 🤗 datasets cache
under a fingerprint of the data, the format flags, the context length and the tokenizer; then
on the first rank of each other node (a cache hit on a shared file system); then every other
rank loads the cached result. With --dataset-streaming nothing is cached: each rank tokenizes
its own slice of the stream as it reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np
import torch
import torch.distributed as dist

from fsdp_qlora.config import ConfigError, TrainConfig
from fsdp_qlora.data.formats import FormatSpec, resolve_format, tokenize_batch
from fsdp_qlora.data.packing import PACK_WINDOW, collate, pack_rows
from fsdp_qlora.data.sampler import ShardedBatchSampler
from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.data.sources import column_names, load_split, load_train_and_eval

PIPELINE_VERSION = 1  # part of every cache fingerprint: bump when tokenization or packing changes
STREAM_SHUFFLE_BUFFER = 10_000
TOKENIZE_BATCH = 1000


def build_train_data(cfg: TrainConfig, tokenizer, rank: int = 0, world_size: int = 1, is_main: bool | None = None,
                     local_rank: int | None = None) -> "TrainData | StreamingTrainData":
    """This rank's training batches (and eval set) for `cfg`; ConfigError on bad data or flags."""
    is_main = rank == 0 if is_main is None else is_main
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.dataset_streaming:
        return _build_streaming(cfg, tokenizer, rank, world_size, is_main, pad_id)
    prepared = _once_per_node(lambda: _prepare(cfg, tokenizer), rank, world_size,
                              rank if local_rank is None else local_rank)
    train_rows, eval_rows, reports, spec = prepared
    lengths = _column(train_rows, "length")
    sampler = ShardedBatchSampler(len(train_rows), cfg.batch_size, rank, world_size, cfg.seed,
                                  lengths=lengths, group_by_length=cfg.group_by_length)
    if len(sampler) == 0:
        raise ConfigError(f"the dataset gives {len(train_rows)} training sequences, fewer than the {world_size} "
                          "ranks: use more data or fewer ranks")
    eval_data = None
    if eval_rows is not None:
        eval_data = EvalData(eval_rows, cfg.eval_batch_size or cfg.batch_size, rank, world_size, pad_id)
    data = TrainData(train_rows, sampler, pad_id, cfg.grad_accum_steps, eval_data, spec.name, reports)
    if is_main:
        print(data.summary(cfg), flush=True)
    return data


# -- preparation: load, tokenize, filter, pack (cached) --------------------------------------

def _prepare(cfg: TrainConfig, tokenizer):
    train_raw, eval_raw = load_train_and_eval(cfg)
    spec = resolve_format(cfg, column_names(train_raw), cfg.dataset)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    train_rows, train_report = _tokenize_and_filter(train_raw, spec, cfg, tokenizer, tokenizer_id, "training")
    reports = {"train": train_report}
    eval_rows = None
    if eval_raw is not None:
        eval_spec = resolve_format(dataclasses.replace(cfg, dataset_format=spec.name), column_names(eval_raw),
                                   f"{cfg.dataset} (eval split)")
        eval_rows, reports["eval"] = _tokenize_and_filter(eval_raw, eval_spec, cfg, tokenizer, tokenizer_id, "eval")
    if cfg.packing:
        train_rows = _pack(train_rows, cfg.context_length)
        eval_rows = _pack(eval_rows, cfg.context_length) if eval_rows is not None else None
    return train_rows, eval_rows, reports, spec


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies the tokenizer's output: vocabulary and merges, specials, chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                getattr(tokenizer, "chat_template", None))
    digest.update(repr(specials).encode())
    return digest.hexdigest()


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([PIPELINE_VERSION, *parts], default=str).encode()).hexdigest()[:32]


def _tokenize_and_filter(raw: datasets.Dataset, spec: FormatSpec, cfg: TrainConfig, tokenizer, tokenizer_id: str,
                         what: str) -> tuple[datasets.Dataset, dict[str, int]]:
    context = cfg.context_length
    tokenized = raw.map(
        _tokenize_with_lengths, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=raw.column_names,
        fn_kwargs={"tokenizer": tokenizer, "spec": spec, "context_length": context},
        num_proc=cfg.dataset_num_proc or None, desc=f"tokenizing the {what} data",
        new_fingerprint=_fingerprint("tokenize", raw._fingerprint, spec.__dict__, context, tokenizer_id))
    full = _column(tokenized, "full_length")
    labelled = _column(tokenized, "num_labels")
    too_long = full > context
    keep = labelled > 0
    if cfg.truncation == "drop":
        keep &= ~too_long
    report = {"examples": len(tokenized), "too_long": int(too_long.sum()), "kept": int(keep.sum()),
              "no_labels": int((labelled == 0).sum()), "dropped_too_long": int((too_long & (labelled > 0)).sum())
              if cfg.truncation == "drop" else 0, "tokens": int(np.minimum(full, context)[keep].sum())}
    if report["kept"] == 0:
        raise ConfigError(f"the {what} data of {cfg.dataset!r} is empty after filtering: {report['examples']} "
                          f"examples, {report['too_long']} longer than --context-length {context}"
                          f"{' (dropped by --truncation drop)' if cfg.truncation == 'drop' else ''}, "
                          f"{report['no_labels']} with no token to learn (e.g. the prompt fills the context): "
                          "raise --context-length, use --truncation truncate, or check the columns")
    if not keep.all():
        tokenized = tokenized.select(np.flatnonzero(keep))
    return tokenized, report


def _tokenize_with_lengths(batch: dict[str, list], tokenizer, spec: FormatSpec, context_length: int):
    out = tokenize_batch(batch, tokenizer, spec, context_length)
    out["length"] = [len(ids) for ids in out["input_ids"]]
    # positions whose next-token loss counts (labels[1:], as the loss shifts by one)
    out["num_labels"] = [sum(label != IGNORE_INDEX for label in labels[1:]) for labels in out["labels"]]
    return out


def _pack(rows: datasets.Dataset, context_length: int) -> datasets.Dataset:
    return rows.map(pack_rows, batched=True, batch_size=PACK_WINDOW, remove_columns=rows.column_names,
                    fn_kwargs={"context_length": context_length}, desc="packing",
                    new_fingerprint=_fingerprint("pack", rows._fingerprint, context_length, PACK_WINDOW))


def _column(rows: datasets.Dataset, name: str) -> np.ndarray:
    return np.asarray(rows.with_format("numpy", columns=[name])[name], dtype=np.int64)


def _once_per_node(fn: Callable[[], Any], rank: int, world_size: int, local_rank: int) -> Any:
    """fn() on rank 0 first, then on the first rank of each other node, then on all other ranks:
    the later calls find the datasets cache. A failure on rank 0 stops every rank, one message."""
    if world_size == 1 or not dist.is_initialized():
        return fn()
    from fsdp_qlora.distributed.env import broadcast_object

    result, failure, error = None, None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
            failure, error = err, (isinstance(err, ConfigError), str(err).splitlines()[0] if str(err) else repr(err))
    error = broadcast_object(error)
    if failure is not None:
        raise failure
    if error is not None:
        is_config, message = error
        raise ConfigError(message) if is_config else RuntimeError(f"rank 0 failed to prepare the data: {message}")
    if rank != 0 and local_rank == 0:
        try:
            result = fn()
        finally:
            dist.barrier()
    else:
        dist.barrier()
    if local_rank != 0:
        result = fn()
    return result


# -- the training stream ---------------------------------------------------------------------

def _rows(dataset: datasets.Dataset, indices: list[int]) -> list[dict[str, list[int]]]:
    columns = dataset[indices]
    keys = [k for k in ("input_ids", "labels", "position_ids") if k in columns]
    return [{k: columns[k][i] for k in keys} for i in range(len(indices))]


class TrainData:
    """This rank's micro-batches, epoch after epoch, from a resumable position.

    The position is (epoch, micro-batches consumed in it); `batches()` starts there and moves
    it as batches are taken, so `state_dict()` at any time is where a resumed run continues.
    """

    def __init__(self, rows: datasets.Dataset, sampler: ShardedBatchSampler, pad_id: int, grad_accum_steps: int,
                 eval_data: "EvalData | None", format_name: str, reports: dict[str, dict[str, int]]):
        self.rows, self.sampler, self.pad_id = rows, sampler, pad_id
        self.eval, self.format_name, self.reports = eval_data, format_name, reports
        self.micro_batches_per_epoch = len(sampler)
        if self.micro_batches_per_epoch < grad_accum_steps:
            raise ConfigError(f"the dataset gives {self.micro_batches_per_epoch} micro-batches per rank, fewer than "
                              f"--grad-accum-steps {grad_accum_steps}: lower --batch-size or --grad-accum-steps")
        self.steps_per_epoch = self.micro_batches_per_epoch // grad_accum_steps
        self.epoch, self.position = 0, 0

    # position and checkpoint state
    @property
    def micro_batches_consumed(self) -> int:
        return self.epoch * self.micro_batches_per_epoch + self.position

    def set_position(self, micro_batches_consumed: int) -> None:
        self.epoch, self.position = divmod(micro_batches_consumed, self.micro_batches_per_epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "micro_batches_in_epoch": self.position,
                "micro_batches_consumed": self.micro_batches_consumed,
                "micro_batches_per_epoch": self.micro_batches_per_epoch, "world_size": self.sampler.world_size,
                "batch_size": self.sampler.batch_size, "seed": self.sampler.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` was taken. Another world size or batch size: continue after the
        same number of examples of the same epoch (rounded down), as the order is reshuffled."""
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise ConfigError(f"the checkpoint's data order used --seed {state['seed']}, not {self.sampler.seed}: "
                              "resume with the same --seed")
        if state.get("num_rows", len(self.rows)) != len(self.rows):
            raise ConfigError(f"the checkpoint was trained on {state['num_rows']} sequences, this data has "
                              f"{len(self.rows)}: resume with the same dataset and data flags")
        epoch, position = state["epoch"], state["micro_batches_in_epoch"]
        old = state.get("world_size", self.sampler.world_size) * state.get("batch_size", self.sampler.batch_size)
        new = self.sampler.world_size * self.sampler.batch_size
        if old != new:
            position = position * old // new
        self.epoch, self.position = epoch, min(position, self.micro_batches_per_epoch)

    # batches
    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from the current position (reshuffled, seeded, every epoch)."""
        while True:
            plan = self.sampler.epoch_batches(self.epoch)
            while self.position < len(plan):
                indices = plan[self.position]
                self.position += 1
                yield collate(_rows(self.rows, indices), self.pad_id)
            self.epoch, self.position = self.epoch + 1, 0

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """Row indices of each micro-batch of `epoch` on this rank (for tests and tools)."""
        return self.sampler.epoch_batches(epoch)

    # reporting
    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / tokens in the padded batches of one epoch on this rank."""
        lengths = _column(self.rows, "length")
        real = padded = 0
        for batch in self.sampler.epoch_batches(epoch):
            row_lengths = lengths[batch]
            real += int(row_lengths.sum())
            padded += len(batch) * int(row_lengths.max())
        return real / padded if padded else 0.0

    def scalars(self) -> dict[str, float]:
        """For TensorBoard: data/efficiency, data/sequences, data/micro_batches_per_epoch."""
        return {"data/efficiency": self.efficiency(), "data/sequences": float(len(self.rows)),
                "data/micro_batches_per_epoch": float(self.micro_batches_per_epoch)}

    def summary(self, cfg: TrainConfig) -> str:
        report = self.reports["train"]
        parts = [f"data: {report['examples']} {self.format_name} examples"]
        if report["too_long"]:
            action = "dropped" if cfg.truncation == "drop" else "truncated"
            other = "truncate" if cfg.truncation == "drop" else "drop"
            parts.append(f"{report['too_long']} longer than --context-length {cfg.context_length} ({action}; "
                         f"--truncation {other} to {other} them instead)")
        if report["no_labels"]:
            parts.append(f"{report['no_labels']} without a token to learn (skipped)")
        if cfg.packing:
            parts.append(f"packed into {len(self.rows)} sequences")
        kind = "packing" if cfg.packing else "padding"
        parts.append(f"{self.micro_batches_per_epoch} micro-batches of {cfg.batch_size} per rank per epoch, "
                     f"{self.steps_per_epoch} steps per epoch; {kind} efficiency {self.efficiency():.1%} "
                     "(real / padded tokens)")
        if self.eval is not None:
            parts.append(f"eval: {len(self.eval.rows)} sequences")
        return "; ".join(parts)


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
            rows = _rows(self.rows, [max(i, 0) for i in chunk])
            for row, index in zip(rows, chunk):
                if index < 0:
                    row["labels"] = [IGNORE_INDEX] * len(row["labels"])
            yield collate(rows, self.pad_id)


# -- streaming -------------------------------------------------------------------------------

class StreamingTrainData:
    """--dataset-streaming: each rank reads its slice of the (buffer-shuffled, seeded per epoch)
    stream and tokenizes as it goes. Resuming re-reads the stream up to the saved position."""

    steps_per_epoch = None
    micro_batches_per_epoch = None

    def __init__(self, cfg: TrainConfig, stream: datasets.IterableDataset, spec: FormatSpec, tokenizer, rank: int,
                 world_size: int, pad_id: int, eval_data: EvalData | None):
        self.cfg, self.stream, self.spec, self.tokenizer = cfg, stream, spec, tokenizer
        self.rank, self.world_size, self.pad_id, self.eval = rank, world_size, pad_id, eval_data
        self.epoch, self.micro_batches_consumed, self._skip = 0, 0, 0
        self.format_name, self.too_long = spec.name, 0

    def set_position(self, micro_batches_consumed: int) -> None:
        self._skip = micro_batches_consumed

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches_consumed": self.micro_batches_consumed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_position(state["micro_batches_consumed"])

    def _examples(self, epoch: int) -> Iterator[dict[str, list[int]]]:
        from datasets.distributed import split_dataset_by_node

        stream = self.stream.shuffle(seed=self.cfg.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        stream.set_epoch(epoch)  # after the split, which does not keep it: the shuffle seed is seed + epoch
        context = self.cfg.context_length
        for example in stream:
            row = _tokenize_with_lengths({k: [v] for k, v in example.items()}, self.tokenizer, self.spec, context)
            row = {k: v[0] for k, v in row.items()}
            if row["full_length"] > context:
                self.too_long += 1
                if self.cfg.truncation == "drop":
                    continue
            if row["num_labels"] > 0:
                yield row

    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        size, rows = self.cfg.batch_size, []
        if not self.cfg.packing:
            for row in self._examples(epoch):
                rows.append(row)
                if len(rows) == size:
                    yield collate(rows, self.pad_id)
                    rows = []
        else:
            window: list[dict] = []
            for row in self._examples(epoch):
                window.append(row)
                if len(window) == PACK_WINDOW:
                    rows += _packed(window, self.cfg.context_length)
                    window = []
                while len(rows) >= size:
                    yield collate(rows[:size], self.pad_id)
                    rows = rows[size:]
            rows += _packed(window, self.cfg.context_length) if window else []
            while len(rows) > size:
                yield collate(rows[:size], self.pad_id)
                rows = rows[size:]
        if rows:
            yield collate(rows, self.pad_id)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        skip, self._skip = self._skip, 0
        self.micro_batches_consumed = 0
        while True:
            produced = 0
            for batch in self._epoch_batches(self.epoch):
                produced += 1
                self.micro_batches_consumed += 1
                if skip:
                    skip -= 1
                    continue
                yield batch
            if produced == 0:
                raise ConfigError(f"the stream {self.cfg.dataset!r} gave rank {self.rank} no usable examples "
                                  f"({self.too_long} longer than --context-length {self.cfg.context_length}): "
                                  "check the data, --context-length and --truncation")
            self.epoch += 1

    def scalars(self) -> dict[str, float]:
        return {}

    def summary(self, cfg: TrainConfig) -> str:
        return f"data: streaming {cfg.dataset!r} ({self.format_name} format), tokenized on the fly by each rank"


def _packed(window: list[dict], context_length: int) -> list[dict[str, list[int]]]:
    packed = pack_rows({"input_ids": [r["input_ids"] for r in window], "labels": [r["labels"] for r in window]},
                       context_length)
    return [{k: packed[k][i] for k in ("input_ids", "labels", "position_ids")} for i in range(len(packed["input_ids"]))]


def _build_streaming(cfg: TrainConfig, tokenizer, rank: int, world_size: int, is_main: bool,
                     pad_id: int) -> StreamingTrainData:
    stream = load_split(cfg, cfg.dataset_split, streaming=True)
    spec = resolve_format(cfg, column_names(stream), cfg.dataset)
    eval_data = None
    if cfg.eval_split:  # eval sets are small: read whole, tokenized in memory on every rank
        eval_raw = datasets.Dataset.from_list(list(load_split(cfg, cfg.eval_split, streaming=True)))
        eval_rows, _ = _tokenize_and_filter(eval_raw, spec, cfg, tokenizer, tokenizer_fingerprint(tokenizer), "eval")
        if cfg.packing:
            eval_rows = _pack(eval_rows, cfg.context_length)
        eval_data = EvalData(eval_rows, cfg.eval_batch_size or cfg.batch_size, rank, world_size, pad_id)
    data = StreamingTrainData(cfg, stream, spec, tokenizer, rank, world_size, pad_id, eval_data)
    if is_main:
        print(data.summary(cfg), flush=True)
    return data
