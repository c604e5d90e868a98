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
import errno
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
from fsdp_qlora.errors import CheckpointWriteError, ConfigError
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
    data: dict[str, Any] = field(default_factory=dict)  # the data position (data/pipeline.py TrainData.state_dict)
    loss_scale: dict[str, Any] = field(default_factory=dict)  # fp16's dynamic loss scale (train/precision.py)
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
        self._pending: tuple[Any, Path, TrainerState, int, str] | None = None
        # A background save must not share a communicator with training: collectives of two
        # threads on one group interleave differently on each rank and deadlock.
        self._save_group = dist.new_group(backend="gloo") if async_save else None

    # -- saving --
    def save(self, model, optimizer, trainer_state: TrainerState) -> None:
        """Save this step; with async_save the tensors are written in the background and the
        checkpoint is committed (renamed, `latest` moved) by the next `wait()`.

        A write that fails on any rank (a full disk, say) fails on every rank together: the
        partial `.tmp-step-*` is removed, the previous checkpoint and `latest` stay as they were,
        and `CheckpointWriteError` says so in one line, with the space a checkpoint needs."""
        self.wait()
        trainer_state = copy.deepcopy(trainer_state)  # the loop goes on mutating its own
        tmp = self.root / f".tmp-step-{trainer_state.step:08d}"
        tensors = {
            "model": get_model_state_dict(model, options=_ADAPTER_ONLY),
            "optim": get_optimizer_state_dict(model, optimizer, options=_ADAPTER_ONLY),
        }
        trainer_state.optimizer_param_groups = _json_groups(tensors["optim"].pop("param_groups"))
        tensor_bytes = _tensor_bytes(tensors)
        rng = json.dumps(capture_rng())  # now: an async save commits after training has moved on
        error = self._agreed_error(self._attempt(lambda: self._make_dir(tmp)))
        if error is None and self.async_save:
            future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._save_group)
            self._pending = (future, tmp, trainer_state, tensor_bytes, rng)
            return
        if error is None:
            # dcp.save fails on every rank when any rank's write fails (DCP gathers the failures).
            error = self._attempt(lambda: dcp.save(tensors, checkpoint_id=str(tmp)))
            faults.maybe_kill_during_save(self.rank, trainer_state.step)
            error = self._finish(tmp, trainer_state, rng, error)
        if error is not None:
            self._abandon(tmp, trainer_state.step, error, tensor_bytes)

    def wait(self) -> None:
        """Finish an asynchronous save, if one is in flight, and commit it."""
        if self._pending is None:
            return
        future, tmp, trainer_state, tensor_bytes, rng = self._pending
        self._pending = None
        error = self._finish(tmp, trainer_state, rng, self._attempt(future.result))
        if error is not None:
            self._abandon(tmp, trainer_state.step, error, tensor_bytes)

    def _finish(self, tmp: Path, trainer_state: TrainerState, rng: str, error: OSError | None) -> OSError | None:
        """After the tensors: this rank's RNG file (the states at save time), then (all ranks agreed) the commit."""
        if error is None:
            error = self._attempt(lambda: (tmp / f"rng-rank{self.rank}.json").write_text(rng))
        error = self._agreed_error(error)
        if error is None:
            error = self._agreed_error(self._attempt(lambda: self._commit(tmp, trainer_state)) if self.rank == 0
                                       else None)
        return error

    def _make_dir(self, tmp: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def _commit(self, tmp: Path, trainer_state: TrainerState) -> None:
        """Rank 0: trainer_state.json (written last, with every file's size), rename, `latest`."""
        trainer_state.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_json_atomic(tmp / TRAINER_STATE, trainer_state.__dict__)
        final = self.root / f"step-{trainer_state.step:08d}"
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of the same step
        os.replace(tmp, final)
        _write_text_atomic(self.root / LATEST, final.name + "\n")
        self._prune()

    @staticmethod
    def _attempt(write) -> OSError | None:
        """Run a write; its OSError (also inside DCP's CheckpointException) is returned, not raised."""
        try:
            write()
        except BaseException as err:  # DCP's CheckpointException is a BaseException; non-write errors re-raise
            os_error = _os_error(err)
            if os_error is None:
                raise
            return os_error
        return None

    def _agreed_error(self, error: OSError | None) -> OSError | None:
        """Every rank learns whether any rank failed (the first failure's error; a barrier too)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return error
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (error.errno, error.strerror) if error else None)
        first = next((g for g in gathered if g is not None), None)
        return error or (OSError(*first) if first else None)

    def _abandon(self, tmp: Path, step: int, error: OSError, tensor_bytes: int) -> None:
        """Remove what the failed save left and raise the one-line error on every rank."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        needed = tensor_bytes
        if dist.is_initialized() and dist.get_world_size() > 1:
            total = torch.tensor([tensor_bytes], dtype=torch.float64)
            dist.all_reduce(total)
            needed = int(total.item())
        previous = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else ""
        if previous and (self.root / previous).is_dir():  # what the last one took, metadata included
            needed = max(needed, sum(f.stat().st_size for f in (self.root / previous).iterdir() if f.is_file()))
        kept = (f"the previous checkpoint {self.root / previous} is intact: rerun the same command to resume from it"
                if previous else "no earlier checkpoint exists: a rerun starts from the beginning")
        free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        what = "no space left on the device" if error.errno == errno.ENOSPC else f"{error.strerror or error}"
        raise CheckpointWriteError(f"cannot save the checkpoint of step {step} in {self.root}: {what}; the partial "
                                   f"save was removed and {kept}; a checkpoint needs about {_mib(needed)} "
                                   f"({_mib(free)} free there): free space or choose another --output-dir")

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

    def load(self, path: Path, model, optimizer) -> TrainerState:
        """Restore a checkpoint's adapter, optimizer state and RNGs (after `check_resume_settings`)."""
        state = read_trainer_state(path)
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


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: itself, or inside DCP's CheckpointException (per-rank
    failures, each an (exception, traceback) pair), or as its cause."""
    if isinstance(err, OSError):
        return err
    for failure in getattr(err, "failures", {}).values():
        found = _os_error(failure[0] if isinstance(failure, tuple) else failure)
        if found is not None:
            return found
    return _os_error(err.__cause__) if err.__cause__ is not None else None


def _tensor_bytes(tensors) -> int:
    """Bytes of the tensors this rank writes (its shards)."""
    total = 0
    for value in tensors.values() if isinstance(tensors, dict) else tensors:
        if isinstance(value, dict):
            total += _tensor_bytes(value)
        elif torch.is_tensor(value):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def read_trainer_state(path: Path) -> TrainerState:
    """A checkpoint's trainer_state.json (JSON only: cheap, before any tensor or weight loads)."""
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"cannot resume from {path}: {problem}")
    return TrainerState(**json.loads((path / TRAINER_STATE).read_text()))


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
