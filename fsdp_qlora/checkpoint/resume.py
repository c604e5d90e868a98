"""What a resume may change, and from where it resumes (`--resume auto | none | PATH`).

A resume continues the same training: the base model, the settings that shape the saved tensors
and those that decide which examples the saved data position counts must be the checkpoint's
(marked on TrainConfig's fields, config.py `on_resume`); batch size, accumulation and world size
may change (the data position is a count of examples, data/pipeline.py). All of it is checked
from JSON before any data or weight loads.
"""

from __future__ import annotations

from pathlib import Path

from fsdp_qlora.checkpoint.manager import LATEST, TRAINER_STATE, CheckpointManager, TrainerState
from fsdp_qlora.config import SAME_DATA, SAME_SHAPE, resume_fields
from fsdp_qlora.errors import ConfigError


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


def check_resume_settings(cfg, saved: TrainerState, path: Path, base_model_id: str) -> None:
    """Refuse, in one line, a resume that would not continue the same training: another base model,
    a setting that shapes the saved tensors, or one that changes which examples the saved data
    position counts (the settings marked on TrainConfig's fields: config.py `on_resume`).
    Batch size, accumulation and world size may change: the position is a count of examples."""
    fresh = "or start fresh in a new --output-dir (or with --resume none)"
    if saved.base_model_id != base_model_id:
        raise ConfigError(f"checkpoint {path} was trained on another base model (id {saved.base_model_id}, this one "
                          f"is {base_model_id}): pass the original --model, {fresh}")
    current = cfg.to_dict()
    for kind, why in ((SAME_SHAPE, "it shapes the saved adapter and optimizer state"),
                      (SAME_DATA, "the saved data position counts examples of that data")):
        for name in resume_fields(kind):
            if name in saved.config and saved.config[name] != current[name]:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"checkpoint {path} was saved with {name}={saved.config[name]!r}, this run has "
                                  f"{current[name]!r} ({why}): resume with {flag} {_shown(saved.config[name])}, "
                                  f"{fresh}")


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
