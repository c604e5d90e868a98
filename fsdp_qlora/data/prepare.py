"""Data preparation: load, tokenize, filter and pack a dataset once, cached under a fingerprint.

Tokenization (and packing) runs once: on global rank 0 first, written to the 🤗 datasets cache
under a fingerprint of the data, the format flags, the context length and the tokenizer; then
on the first rank of each other node (a cache hit on a shared file system); then every other
rank loads the cached result (`once_per_node`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch.distributed as dist

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.formats import FormatSpec, resolve_format, tokenize_batch
from fsdp_qlora.data.packing import PACK_WINDOW, pack_rows
from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.data.sources import column_names, load_train_and_eval
from fsdp_qlora.errors import ConfigError

PIPELINE_VERSION = 1  # part of every cache fingerprint: bump when tokenization or packing changes
TOKENIZE_BATCH = 1000


def prepare(cfg: TrainConfig, tokenizer):
    train_raw, eval_raw = load_train_and_eval(cfg)
    spec = resolve_format(cfg, column_names(train_raw), cfg.dataset)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    train_rows, train_report = tokenize_and_filter(train_raw, spec, cfg, tokenizer, tokenizer_id, "training")
    reports = {"train": train_report}
    eval_rows = None
    if eval_raw is not None:
        eval_spec = resolve_format(dataclasses.replace(cfg, dataset_format=spec.name), column_names(eval_raw),
                                   f"{cfg.dataset} (eval split)")
        eval_rows, reports["eval"] = tokenize_and_filter(eval_raw, eval_spec, cfg, tokenizer, tokenizer_id, "eval")
    if cfg.packing:
        train_rows = pack(train_rows, cfg.context_length)
        eval_rows = pack(eval_rows, cfg.context_length) if eval_rows is not None else None
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


def tokenize_and_filter(raw: datasets.Dataset, spec: FormatSpec, cfg: TrainConfig, tokenizer, tokenizer_id: str,
                         what: str) -> tuple[datasets.Dataset, dict[str, int]]:
    context = cfg.context_length
    tokenized = raw.map(
        tokenize_with_lengths, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=raw.column_names,
        fn_kwargs={"tokenizer": tokenizer, "spec": spec, "context_length": context},
        num_proc=cfg.dataset_num_proc or None, desc=f"tokenizing the {what} data",
        new_fingerprint=_fingerprint("tokenize", raw._fingerprint, spec.__dict__, context, tokenizer_id))
    full = column(tokenized, "full_length")
    labelled = column(tokenized, "num_labels")
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


def tokenize_with_lengths(batch: dict[str, list], tokenizer, spec: FormatSpec, context_length: int):
    out = tokenize_batch(batch, tokenizer, spec, context_length)
    out["length"] = [len(ids) for ids in out["input_ids"]]
    # positions whose next-token loss counts (labels[1:], as the loss shifts by one)
    out["num_labels"] = [sum(label != IGNORE_INDEX for label in labels[1:]) for labels in out["labels"]]
    return out


def pack(rows: datasets.Dataset, context_length: int) -> datasets.Dataset:
    return rows.map(pack_rows, batched=True, batch_size=PACK_WINDOW, remove_columns=rows.column_names,
                    fn_kwargs={"context_length": context_length}, desc="packing",
                    new_fingerprint=_fingerprint("pack", rows._fingerprint, context_length, PACK_WINDOW))


def column(rows: datasets.Dataset, name: str) -> np.ndarray:
    return np.asarray(rows.with_format("numpy", columns=[name])[name], dtype=np.int64)


def once_per_node(fn: Callable[[], Any], rank: int, world_size: int, local_rank: int) -> Any:
    """fn() on rank 0 first, then on the first rank of each other node, then on all other ranks:
    the later calls find the datasets cache. A failure on rank 0 stops every rank, one message."""
    if world_size == 1 or not dist.is_initialized():
        return fn()
    result, failure, error = None, None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
            failure, error = err, (isinstance(err, ConfigError), str(err).splitlines()[0] if str(err) else repr(err))
    box = [error]
    dist.broadcast_object_list(box, src=0)
    error = box[0]
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


