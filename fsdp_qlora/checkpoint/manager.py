"""Sharded, atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

Layout under ``<output_dir>/checkpoints/``::

    step-00000010/          a complete checkpoint
        .metadata, __0_0.distcp, ...   DCP: adapter params + optimizer tensors, each rank its part
        rng-rank0.json ...             every rank's python/numpy/torch RNG states
        trainer_state.json             written last: step, tokens, scheduler, data position,
                                       optimizer hyper-parameters, base identity, config, and
                                       the size of every file above (the validity check)
    latest                  text file naming the newest complete checkpoint
    .tmp-step-00000015/     a save in progress (ignored, removed by the next save)

Atomicity: every rank writes into ``.tmp-step-N``; after all ranks finished (a barrier),
rank 0 writes ``trainer_state.json``, renames the directory to ``step-N`` and then replaces
``latest``. A crash at any point leaves the previous checkpoint untouched and valid.

Only tensors go through DCP, and nothing is ever unpickled: DCP loads non-tensor entries with
``torch.load(weights_only=False)``, so every non-tensor value lives in JSON instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fsdp_qlora import faults
from fsdp_qlora.config import ConfigError
from fsdp_qlora.model.sources import safetensors_files

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
_ADAPTER_ONLY = StateDictOptions(ignore_frozen_params=True)


@dataclass
class TrainerState:
    """Everything besides tensors that a resume needs, saved as JSON by rank 0."""

    step: int = 0
    tokens_seen: int = 0
    micro_batches_consumed: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    optimizer_param_groups: list[dict[str, Any]] = field(default_factory=list)
    base_model_id: str = ""
    base_model_path: str = ""
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)


def base_model_identity(model_dir: Path) -> str:
    """A hash of the base's config.json and, per weight file, its name, size and first and last
    64 KiB (the safetensors header plus weight bytes at both ends).

    Cheap (a 70B base is 140 GB; this reads ~128 KiB per shard) yet it tells apart another
    model, another revision or another shard layout, even with identical shapes.
    """
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    sample = 64 * 1024
    for file in safetensors_files(model_dir):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(sample))
            handle.seek(max(0, size - sample))
            digest.update(handle.read(sample))
    return digest.hexdigest()[:16]


# ---- RNG ---------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


# ---- the manager -------------------------------------------------------------------------------
class CheckpointManager:
    def __init__(self, output_dir: Path, rank: int, keep_last: int = 2, async_save: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple[Any, Path, TrainerState] | None = None
        # A background save must not share a communicator with training: collectives of two
        # threads on one group interleave differently on each rank and deadlock.
        self._save_group = dist.new_group(backend="gloo") if async_save else None

    # -- saving --
    def save(self, model, optimizer, trainer_state: TrainerState) -> None:
        """Save this step; with async_save the tensors are written in the background and the
        checkpoint is committed (renamed, `latest` moved) by the next `wait()`."""
        self.wait()
        trainer_state = copy.deepcopy(trainer_state)  # the loop goes on mutating its own
        tmp = self.root / f".tmp-step-{trainer_state.step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        tensors = {
            "model": get_model_state_dict(model, options=_ADAPTER_ONLY),
            "optim": get_optimizer_state_dict(model, optimizer, options=_ADAPTER_ONLY),
        }
        trainer_state.optimizer_param_groups = _json_groups(tensors["optim"].pop("param_groups"))
        (tmp / f"rng-rank{self.rank}.json").write_text(json.dumps(capture_rng()))
        if self.async_save:
            future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._save_group)
            self._pending = (future, tmp, trainer_state)
        else:
            dcp.save(tensors, checkpoint_id=str(tmp))
            faults.maybe_kill_during_save(self.rank, trainer_state.step)
            self._commit(tmp, trainer_state)

    def wait(self) -> None:
        """Finish an asynchronous save, if one is in flight, and commit it."""
        if self._pending is None:
            return
        future, tmp, trainer_state = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, trainer_state)

    def _commit(self, tmp: Path, trainer_state: TrainerState) -> None:
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            trainer_state.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            _write_json_atomic(tmp / TRAINER_STATE, trainer_state.__dict__)
            final = self.root / f"step-{trainer_state.step:08d}"
            shutil.rmtree(final, ignore_errors=True)  # a stale copy of the same step
            os.replace(tmp, final)
            _write_text_atomic(self.root / LATEST, final.name + "\n")
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        complete = self.list_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- finding and loading --
    def list_checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if p.is_dir())

    def newest_valid(self) -> Path | None:
        """The newest checkpoint whose files are all present with their recorded sizes."""
        for candidate in reversed(self.list_checkpoints()):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            if self.rank == 0:
                print(f"warning: skipping checkpoint {candidate}: {problem}", flush=True)
        return None

    def load(self, path: Path, model, optimizer, base_model_id: str, must_match: dict[str, Any]) -> TrainerState:
        """Restore a checkpoint. `must_match`: settings that shape the saved tensors (optimizer,
        adapter type and rank, targets); a resume that changes one is refused up front."""
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"cannot resume from {path}: {problem}")
        state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
        for key, value in must_match.items():
            saved = state.config.get(key, value)
            if saved != value:
                raise ConfigError(f"checkpoint {path} was saved with {key}={saved!r}, this run has {value!r}: "
                                  f"resume with the same --{key.replace('_', '-')}, or start fresh (--resume none "
                                  "or a new --output-dir)")
        if state.base_model_id != base_model_id:
            raise ConfigError(f"checkpoint {path} was trained on another base model "
                              f"(id {state.base_model_id}, this one is {base_model_id}): pass the original "
                              "--model, or --resume none / a new --output-dir to start fresh")
        tensors = {
            "model": get_model_state_dict(model, options=_ADAPTER_ONLY),
            "optim": get_optimizer_state_dict(model, optimizer, options=_ADAPTER_ONLY),
        }
        tensors["optim"].pop("param_groups")
        dcp.load(tensors, checkpoint_id=str(path))  # reshards when the world size changed
        set_model_state_dict(model, tensors["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
        tensors["optim"]["param_groups"] = _groups_from_json(state.optimizer_param_groups)
        set_optimizer_state_dict(model, optimizer, tensors["optim"], options=_ADAPTER_ONLY)
        rng_file = path / f"rng-rank{self.rank}.json"
        if rng_file.is_file():  # absent for ranks that did not exist in the saving run
            restore_rng(json.loads(rng_file.read_text()))
        return state


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint, or None if it is."""
    meta = path / TRAINER_STATE
    if not meta.is_file():
        return f"{TRAINER_STATE} is missing (the save never completed)"
    try:
        files = json.loads(meta.read_text())["files"]
    except (ValueError, KeyError):
        return f"{TRAINER_STATE} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is truncated or altered ({file.stat().st_size} bytes, expected {size})"
    return None


def load_adapter_tensors(path: Path) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """The full adapter tensors of a checkpoint, in one process, without a model or a process
    group: DCP reassembles every rank's shards into full tensors."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"{path} is not a usable checkpoint: {problem}")
    state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    metadata = FileSystemReader(str(path)).read_metadata()
    tensors = {fqn: torch.empty(item.size, dtype=item.properties.dtype)
               for fqn, item in metadata.state_dict_metadata.items()
               if fqn.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    dcp.load(tensors, checkpoint_id=str(path), no_dist=True)
    return state, {fqn.removeprefix("model."): tensor for fqn, tensor in tensors.items()}


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """`--resume auto | none | PATH` -> the checkpoint to load, if any."""
    if resume == "none":
        return None
    if resume == "auto":
        return manager.newest_valid()
    path = Path(resume)
    if not (path / TRAINER_STATE).exists() and (path / "checkpoints" / LATEST).is_file():
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory; pass auto, none, or a step-* directory")
    return path


def _json_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]


def _groups_from_json(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    _write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))
