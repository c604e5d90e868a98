"""The typed training config: single source of truth for CLI flags, YAML keys and docs.

Every field of `TrainConfig` is a YAML key (``lora_rank``) and a kebab-case flag
(``--lora-rank``). Precedence, lowest first: field defaults, the model alias' recommended
settings, ``--config file.yaml``, then flags on the command line.

The CLI is generated with the standard library's argparse rather than a third-party parser:
the generator is a few dozen lines, and it gives exact control over the flag spelling and over
errors, which must be one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2, before any expensive work."""


def _opt(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


TRAIN_TYPES = ("qlora",)
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # -- model and data --
    model: str = _opt("tiny-llama", "model alias (see docs), hub id, or local directory with config.json + *.safetensors")
    dataset: str = _opt("sample", "'sample' (bundled), a local .json/.jsonl file, or a hub dataset id")
    output_dir: str = _opt("", "run directory; default runs/<model>-<timestamp>")
    model_cache_dir: str = _opt("", "where generated/downloaded models live; default $FSDP_QLORA_CACHE or ~/.cache/fsdp_qlora")
    trust_remote_code: bool = _opt(False, "allow model code from the hub (off unless you ask)")
    # -- adapter --
    train_type: str = _opt("qlora", "qlora: NF4 base + LoRA", choices=TRAIN_TYPES)
    lora_rank: int = _opt(8, "LoRA rank r")
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha/r")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = _opt(DEFAULT_TARGET_MODULES, "linear layers (last name component) that get adapters")
    # -- batch and schedule --
    batch_size: int = _opt(4, "sequences per rank per micro-step")
    grad_accum_steps: int = _opt(1, "micro-steps per optimizer step")
    context_length: int = _opt(512, "maximum tokens per sequence (longer examples are truncated)")
    max_steps: int = _opt(-1, "optimizer steps; -1 = run --num-epochs epochs")
    num_epochs: int = _opt(1, "epochs over the dataset when --max-steps is -1")
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    warmup_steps: int = _opt(10, "linear warmup steps, then cosine decay to 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables")
    seed: int = _opt(42, "seed for adapter init, data order and dropout")
    # -- logging --
    log_every: int = _opt(1, "log metrics every N optimizer steps")
    # -- checkpoints and failures --
    save_every: int = _opt(50, "save a sharded checkpoint every N optimizer steps (and always at the end); 0 = end only")
    keep_last: int = _opt(2, "complete checkpoints to keep; older ones are deleted")
    resume: str = _opt("auto", "auto (newest valid checkpoint in the output dir, if any), none, or a checkpoint path")
    async_save: bool = _opt(False, "write checkpoints in the background (DCP async_save) while training goes on")
    max_bad_steps: int = _opt(5, "abort (saving the last good state) after this many non-finite losses in a row")
    collective_timeout_s: float = _opt(600.0, "seconds before a hung collective (e.g. a dead rank) fails the job")

    def validate(self) -> "TrainConfig":
        positive = ("lora_rank", "batch_size", "grad_accum_steps", "context_length", "num_epochs", "log_every",
                    "keep_last", "max_bad_steps", "collective_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be positive or -1 (use epochs), got {self.max_steps}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.save_every < 0:
            raise ConfigError(f"--save-every must be >= 0 (0 = save at the end only), got {self.save_every}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not self.lora_target_modules:
            raise ConfigError("--lora-target-modules is empty: name at least one linear layer, e.g. q_proj")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def _field_type(f: dataclasses.Field) -> Any:
    return typing.get_type_hints(TrainConfig)[f.name]


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, types.GenericAlias) or tp is list


def _parse_list(value: str | list) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [part for item in items for part in str(item).split(",") if part]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description="QLoRA fine-tuning on FSDP2.", allow_abbrev=False)
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of config keys; flags override it")
    for f in config_fields():
        tp = _field_type(f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,  # so only flags actually given override YAML/alias values
            "help": f"{f.metadata['help']} (default: {shown!r})",
        }
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(tp):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "NAME"
        else:
            kwargs["type"] = tp
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)
    return parser


def _coerce(name: str, value: Any) -> Any:
    f = next(f for f in config_fields() if f.name == name)
    tp = _field_type(f)
    try:
        if _is_list(tp):
            return _parse_list(value)
        if tp is bool and not isinstance(value, bool):
            raise TypeError
        value = tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def load_yaml_overrides(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys")
    known = {f.name for f in config_fields()}
    overrides = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else "see docs/configuration.md"
            raise ConfigError(f"unknown key '{key}' in {path}: {fix}")
        overrides[name] = value
    return overrides


def parse_config(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    """Flags (and YAML) -> a validated TrainConfig. Alias recommendations apply under both."""
    from fsdp_qlora.model.sources import recommended_settings  # avoid an import cycle

    args = vars(build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv))
    yaml_values = load_yaml_overrides(args.pop("config")) if "config" in args else {}
    chosen = {**yaml_values, **args}
    model = chosen.get("model", TrainConfig.model)
    values = {**recommended_settings(model), **chosen}
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def config_reference_markdown() -> str:
    """docs/configuration.md, generated from TrainConfig so that it never drifts."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python tools/gen_config_docs.py` from fsdp_qlora/config.py; do not edit. -->",
        "",
        "Every setting is a `train.py` flag and a YAML key of the same name (`--lora-rank` / `lora_rank`).",
        "Precedence, lowest first: the defaults below, the model alias' recommended settings",
        "(`fsdp_qlora/model/sources.py`), `--config file.yaml`, then flags. The run's resolved",
        "settings are saved as `config.yaml` in its output directory, reusable with `--config`.",
        "",
        "| flag | YAML key | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in config_fields():
        tp = _field_type(f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ", ".join(default) if isinstance(default, list) else repr(default)
        type_name = "list of names" if _is_list(tp) else getattr(tp, "__name__", str(tp))
        choices = f.metadata["choices"]
        meaning = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
        flag = f"`--{_flag(f.name)}`" + (f" / `--no-{_flag(f.name)}`" if tp is bool else "")
        lines.append(f"| {flag} | `{f.name}` | {type_name} | `{shown}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
