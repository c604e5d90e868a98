"""--dataset -> a 🤗 datasets Dataset (or IterableDataset when streaming), and its eval split.

'sample'           the bundled instruction file
'synthetic'        seeded random text, every row at least --context-length tokens (memory and speed checks)
*.json / *.jsonl   local files, read with datasets' json, parquet, csv and text builders
*.parquet / *.csv
*.txt              one example per line (column ``text``)
a directory        saved with ``save_to_disk`` (a Dataset, or a DatasetDict: --dataset-split picks)
anything else      a hub dataset id, with --dataset-config and --dataset-split
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.file_check import file_problem
from fsdp_qlora.data.make_sample_data import SAMPLE_DATASET_PATH
from fsdp_qlora.errors import ConfigError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
SYNTHETIC = "synthetic"
SYNTHETIC_STEPS = 2  # optimizer steps per epoch that --dataset synthetic makes rows for (epochs repeat)


def _looks_local(name: str) -> bool:
    return Path(name).suffix in FILE_BUILDERS or name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_split(cfg: TrainConfig, split: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """One split of --dataset. Local files have a single split, 'train'."""
    name = cfg.dataset
    if name == "sample":
        return datasets.load_dataset("json", data_files=str(SAMPLE_DATASET_PATH), split=split, streaming=streaming)
    if name == SYNTHETIC:
        if split != "train":
            raise ConfigError(f"--dataset synthetic has one split, 'train', not {split!r}: use --eval-fraction")
        rows = synthetic_text(cfg)
        return rows.to_iterable_dataset() if streaming else rows
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_saved(path, split, streaming)
    if path.suffix in FILE_BUILDERS:
        if not path.is_file():
            raise ConfigError(f"dataset file {path} does not exist: pass an existing "
                              f"{'/'.join(FILE_BUILDERS)} file, a save_to_disk directory, 'sample' for the "
                              "bundled data, or a hub dataset id to --dataset")
        if split != "train":
            raise ConfigError(f"a local file has one split, 'train', not {split!r}: use --eval-fraction "
                              "(or save a DatasetDict with save_to_disk) for an eval set")
        return _load_file(path, streaming)
    if _looks_local(name):
        raise ConfigError(f"dataset {name!r} is neither an existing file with a suffix in "
                          f"{', '.join(FILE_BUILDERS)} nor a save_to_disk directory: check the path")
    try:
        return datasets.load_dataset(name, cfg.dataset_config or None, split=split, streaming=streaming)
    except ValueError as err:  # e.g. an unknown split or config: datasets lists the valid ones
        raise ConfigError(f"dataset {name!r}: {_first_line(err)}: check --dataset-config/--dataset-split/"
                          "--eval-split") from None
    except (FileNotFoundError, ConnectionError) as err:
        raise ConfigError(f"dataset {name!r} could not be loaded ({_first_line(err)}): pass a hub id that exists "
                          "(online, or in the datasets cache when offline) or a local file/directory") from None


def synthetic_text(cfg: TrainConfig) -> datasets.Dataset:
    """--dataset synthetic: rows of words drawn (seeded by --seed) from the bundled sample's, --context-length
    words each. A word is at least one token, so after truncation every row is exactly --context-length tokens
    with loss on all of them, whatever the tokenizer: the batches of a real run at that context (the memory
    of --synthetic-weights runs; the loss means nothing). Rows for SYNTHETIC_STEPS optimizer steps of the
    launch's ranks (WORLD_SIZE) per epoch, few so that tokenizing them stays quick at any scale; epochs
    repeat (reshuffled)."""
    rows_text = [json.loads(line) for line in SAMPLE_DATASET_PATH.read_text().splitlines() if line.strip()]
    words = sorted({word for row in rows_text for value in row.values() for word in str(value).split()})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    count = SYNTHETIC_STEPS * world * cfg.batch_size * cfg.grad_accum_steps
    drawn = np.random.default_rng(cfg.seed).integers(0, len(words), size=(count, cfg.context_length))
    return datasets.Dataset.from_dict({"text": [" ".join(words[i] for i in row) for row in drawn]})


def _load_file(path: Path, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """A local data file through datasets' builder; a file it cannot read is one line naming the
    file, the first bad line and what is wrong with it (data/file_check.py), before any weight loads."""
    try:
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train",
                                     streaming=streaming)
    except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many types for a malformed file
        problem = file_problem(path) or _first_line(err)
        raise ConfigError(f"dataset file {path}: {problem}: fix the file (or that line) and rerun") from None


def _load_saved(path: Path, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path} is a directory but not one written by save_to_disk: pass such a directory, "
                          "or a data file") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"{path} has splits {', '.join(loaded)}, not {split!r}: choose one with "
                              "--dataset-split/--eval-split")
        loaded = loaded[split]
    elif split != "train":
        raise ConfigError(f"{path} holds one Dataset, no split {split!r}: use --eval-fraction for an eval set")
    return loaded.to_iterable_dataset() if streaming else loaded


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_train_and_eval(cfg: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and the eval set (--eval-split, or a seeded --eval-fraction hold-out)."""
    train = load_split(cfg, cfg.dataset_split)
    if cfg.eval_split:
        return train, load_split(cfg, cfg.eval_split)
    if cfg.eval_fraction:
        held = max(1, round(len(train) * cfg.eval_fraction))
        if held >= len(train):
            raise ConfigError(f"--eval-fraction {cfg.eval_fraction} leaves no training examples out of "
                              f"{len(train)}: lower it")
        parts = train.train_test_split(test_size=held, seed=cfg.seed, shuffle=True)
        return parts["train"], parts["test"]
    return train, None


def column_names(dataset) -> list[str]:
    """Columns of a Dataset, or of a stream (from its features, or its first row)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first else []
