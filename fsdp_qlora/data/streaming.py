"""--dataset-streaming: each rank reads and tokenizes its slice of the stream as it trains."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import torch

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.eval_data import EvalData
from fsdp_qlora.data.formats import FormatSpec, resolve_format
from fsdp_qlora.data.packing import PACK_WINDOW, collate, pack_rows
from fsdp_qlora.data.prepare import pack, tokenize_and_filter, tokenize_with_lengths, tokenizer_fingerprint
from fsdp_qlora.data.sources import column_names, load_split
from fsdp_qlora.errors import ConfigError

STREAM_SHUFFLE_BUFFER = 10_000


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
        return {"micro_batches_consumed": self.micro_batches_consumed, "epoch": self.epoch,
                "world_size": self.world_size, "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Re-read the stream up to the saved position. Each rank reads its own slice of the stream
        (split by the world size) in batches: the position holds for the same ranks and batch size."""
        layout = (state.get("world_size", self.world_size), state.get("batch_size", self.cfg.batch_size))
        if layout != (self.world_size, self.cfg.batch_size):
            raise ConfigError(f"--dataset-streaming: the checkpoint read the stream on {layout[0]} ranks with "
                              f"--batch-size {layout[1]}, this run has {self.world_size} and {self.cfg.batch_size}: "
                              "a stream position holds only for the same ranks and batch size; resume with those, "
                              "or start fresh in a new --output-dir")
        self.set_position(state["micro_batches_consumed"])

    def _examples(self, epoch: int) -> Iterator[dict[str, list[int]]]:
        from datasets.distributed import split_dataset_by_node

        stream = self.stream.shuffle(seed=self.cfg.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        stream.set_epoch(epoch)  # after the split, which does not keep it: the shuffle seed is seed + epoch
        context = self.cfg.context_length
        for example in stream:
            row = tokenize_with_lengths({k: [v] for k, v in example.items()}, self.tokenizer, self.spec, context)
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


def build_streaming(cfg: TrainConfig, tokenizer, rank: int, world_size: int, is_main: bool,
                     pad_id: int) -> StreamingTrainData:
    stream = load_split(cfg, cfg.dataset_split, streaming=True)
    spec = resolve_format(cfg, column_names(stream), cfg.dataset)
    eval_data = None
    if cfg.eval_split:  # eval sets are small: read whole, tokenized in memory on every rank
        eval_raw = datasets.Dataset.from_list(list(load_split(cfg, cfg.eval_split, streaming=True)))
        eval_rows, _ = tokenize_and_filter(eval_raw, spec, cfg, tokenizer, tokenizer_fingerprint(tokenizer), "eval")
        if cfg.packing:
            eval_rows = pack(eval_rows, cfg.context_length)
        eval_data = EvalData(eval_rows, cfg.eval_batch_size or cfg.batch_size, rank, world_size, pad_id)
    data = StreamingTrainData(cfg, stream, spec, tokenizer, rank, world_size, pad_id, eval_data)
    if is_main:
        print(data.summary(cfg), flush=True)
    return data
