"""The data the training loop uses: `build_train_data(cfg, tokenizer, ...) -> TrainData`.

    data = build_train_data(cfg, tokenizer, env.rank, env.world_size, env.is_main, env.local_rank)
    data.load_state_dict(saved)                       # a checkpoint's position (any layout)
    batches = data.batches()                          # endless: epoch after epoch
    next(batches) -> {"input_ids", "labels", "attention_mask"[, "position_ids" when packing]}
    data.state_dict()                                 # epoch + examples consumed, for checkpoints
    data.eval                                         # EvalData or None; data.eval.batches()

Preparation (load, tokenize, filter, pack; cached) is data/prepare.py; --dataset-streaming is
data/streaming.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import datasets
import torch

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.eval_data import EvalData
from fsdp_qlora.data.packing import collate, rows_at
from fsdp_qlora.data.prepare import column, once_per_node, prepare
from fsdp_qlora.data.sampler import ShardedBatchSampler
from fsdp_qlora.data.streaming import StreamingTrainData, build_streaming
from fsdp_qlora.errors import ConfigError


def build_train_data(cfg: TrainConfig, tokenizer, rank: int = 0, world_size: int = 1, is_main: bool | None = None,
                     local_rank: int | None = None) -> "TrainData | StreamingTrainData":
    """This rank's training batches (and eval set) for `cfg`; ConfigError on bad data or flags."""
    is_main = rank == 0 if is_main is None else is_main
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.dataset_streaming:
        return build_streaming(cfg, tokenizer, rank, world_size, is_main, pad_id)
    prepared = once_per_node(lambda: prepare(cfg, tokenizer), rank, world_size,
                             rank if local_rank is None else local_rank)
    train_rows, eval_rows, reports, spec = prepared
    lengths = column(train_rows, "length")
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


class TrainData:
    """This rank's micro-batches, epoch after epoch, from a resumable position.

    The position is (epoch, examples of its global order consumed); `batches()` starts there and
    moves it as batches are taken, so `state_dict()` at any time is where a resumed run continues.
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
        self.fingerprint = getattr(rows, "_fingerprint", "")  # datasets' fingerprint of the prepared rows
        self.epoch, self.examples_in_epoch = 0, 0

    # position and checkpoint state
    # The position is (epoch, examples consumed in it): a count of the epoch's global order
    # (every rank's micro-batch i holds the next world x batch examples of it, rank r every
    # world-th), so it means the same whatever the world size, batch size or accumulation.
    @property
    def examples_per_micro_batch(self) -> int:
        """Examples of the global order one micro-step consumes (all ranks)."""
        return self.sampler.world_size * self.sampler.batch_size

    @property
    def micro_batches_consumed(self) -> int:
        """Micro-batches of this layout since the start (as if from the start with this layout)."""
        into_epoch = math.ceil(self.examples_in_epoch / self.examples_per_micro_batch)
        return self.epoch * self.micro_batches_per_epoch + into_epoch

    def set_position(self, micro_batches_consumed: int) -> None:
        """Go to a position counted in this layout's micro-batches."""
        self.epoch, position = divmod(micro_batches_consumed, self.micro_batches_per_epoch)
        self.examples_in_epoch = min(position * self.sampler.batch_size, self.sampler.per_rank) * self.sampler.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "examples_in_epoch": self.examples_in_epoch,
                "examples_per_micro_batch": self.examples_per_micro_batch, "seed": self.sampler.seed,
                "num_rows": len(self.rows), "fingerprint": self.fingerprint,
                "group_by_length": self.sampler.group_by_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after exactly the examples `state` had consumed, in the same order, whatever this
        run's world size, batch size and accumulation (the order is the seed's, not the layout's).
        Another seed or data: refused, one line (the position would mean other examples)."""
        fresh = "or start fresh with --resume none (or a new --output-dir)"
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise ConfigError(f"--seed is {self.sampler.seed} but the checkpoint's data order used --seed "
                              f"{state['seed']}: resume with --seed {state['seed']}, {fresh}")
        if state.get("num_rows", len(self.rows)) != len(self.rows) or \
                state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ConfigError(f"the data is not the checkpoint's ({len(self.rows)} sequences now, "
                              f"{state.get('num_rows')} then, or the same count with other content): resume with "
                              f"the same --dataset and data flags, {fresh}")
        if "examples_in_epoch" not in state:  # checkpoints before positions were counted in examples
            per_step = state.get("world_size", self.sampler.world_size) * state.get("batch_size", self.sampler.batch_size)
            state = {**state, "examples_in_epoch": state["micro_batches_in_epoch"] * per_step,
                     "examples_per_micro_batch": per_step}
        if self.sampler.group_by_length and state["examples_per_micro_batch"] != self.examples_per_micro_batch:
            # Length-grouped batches are formed per rank and shuffled: a position is a batch count,
            # which only holds for the same ranks x batch size.
            raise ConfigError(f"--group-by-length: the checkpoint consumed its data in batches of "
                              f"{state['examples_per_micro_batch']} sequences over all ranks, this run takes "
                              f"{self.examples_per_micro_batch}: resume with the same ranks x --batch-size, {fresh}")
        self.epoch, self.examples_in_epoch = state["epoch"], state["examples_in_epoch"]

    # batches
    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from the current position (reshuffled, seeded, every epoch)."""
        while True:
            for indices in self._epoch_plan():
                self.examples_in_epoch += len(indices) * self.sampler.world_size
                yield collate(rows_at(self.rows, indices), self.pad_id)
            self.epoch, self.examples_in_epoch = self.epoch + 1, 0

    def _epoch_plan(self) -> list[list[int]]:
        if self.sampler.group_by_length:  # a position is a whole number of this layout's batches
            return self.sampler.epoch_batches(self.epoch)[self.examples_in_epoch // self.examples_per_micro_batch:]
        return self.sampler.epoch_batches(self.epoch, start=self.examples_in_epoch)

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """Row indices of each micro-batch of `epoch` on this rank (for tests and tools)."""
        return self.sampler.epoch_batches(epoch)

    # reporting
    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / tokens in the padded batches of one epoch on this rank."""
        lengths = column(self.rows, "length")
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
