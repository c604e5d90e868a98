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
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsdp_qlora.errors import ConfigError  # noqa: F401  (config.ConfigError: the name users catch)

# `on_resume` marks a field a resumed run must keep (checked before data or weights load):
# SAME_SHAPE fields shape the checkpoint's tensors (adapter, optimizer state); SAME_DATA fields decide
# which examples the saved data position counts (checkpoint/manager.py: check_resume_settings).
SAME_SHAPE, SAME_DATA = "shape", "data"


def _opt(default: Any, help: str, choices: tuple | None = None, on_resume: str | None = None, **kw) -> Any:
    metadata = {"help": help, "choices": choices, "on_resume": on_resume}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


TRAIN_TYPES = ("qlora", "qdora", "lora", "dora")
QUANTIZED_TRAIN_TYPES = ("qlora", "qdora")  # NF4 base; lora/dora keep the base in bf16
DORA_TRAIN_TYPES = ("qdora", "dora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
SHARDING_TYPES = ("auto", "fsdp", "hsdp", "ddp")
DATASET_FORMATS = ("auto", "instruction", "chat", "text")
TRUNCATION_MODES = ("truncate", "drop")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
FSDP_UNITS = ("auto", "layer", "model")
DEFAULT_TARGET_MODULES = ["all-linear"]  # every linear of every decoder layer (peft/targets.py)


@dataclass
class TrainConfig:
    # -- model and data --
    model: str = _opt("tiny-llama", "model alias (see docs), hub id, or local directory with config.json + *.safetensors")
    synthetic_weights: bool = _opt(False, "no checkpoint: build --model (an alias, tiny-llama or a local config.json) "
                                   "from its config and fill the base with seeded random weights, quantized on "
                                   "each rank: the real memory and speed of a configuration before downloading it "
                                   "(the loss means nothing). Tokenizer: the config directory's own, else the "
                                   "bundled one; with --dataset synthetic every row fills --context-length "
                                   "(docs/memory.md)")
    dataset: str = _opt("sample", "'sample' (bundled), 'synthetic' (seeded random text, every row --context-length "
                        "tokens: memory and speed checks), a local .json/.jsonl/.parquet/.csv/.txt file, a directory "
                        "saved with datasets' save_to_disk, or a hub dataset id (docs/data.md)", on_resume=SAME_DATA)
    dataset_config: str = _opt("", "hub dataset config (subset) name, e.g. 'main'", on_resume=SAME_DATA)
    dataset_split: str = _opt("train", "split to train on (hub datasets and save_to_disk directories)", on_resume=SAME_DATA)
    dataset_format: str = _opt("auto", "instruction: alpaca-style columns; chat: a list of role/content messages "
                               "rendered with the tokenizer's chat template, loss on assistant turns; text: raw text, "
                               "loss on all of it; auto: from the columns", choices=DATASET_FORMATS, on_resume=SAME_DATA)
    instruction_column: str = _opt("instruction", "instruction format: the instruction column", on_resume=SAME_DATA)
    input_column: str = _opt("input", "instruction format: the optional input column", on_resume=SAME_DATA)
    output_column: str = _opt("output", "instruction format: the response column (the only one with loss)", on_resume=SAME_DATA)
    messages_column: str = _opt("messages", "chat format: the column holding the list of {role, content} messages", on_resume=SAME_DATA)
    text_column: str = _opt("text", "text format: the column of raw text", on_resume=SAME_DATA)
    dataset_streaming: bool = _opt(False, "stream the dataset instead of downloading and caching it whole "
                                   "(needs --max-steps; tokenized on the fly by each rank)", on_resume=SAME_DATA)
    dataset_num_proc: int = _opt(0, "processes that tokenize (datasets' num_proc); 0 = the main process only")
    truncation: str = _opt("truncate", "examples longer than --context-length: truncate them or drop them "
                           "(counted and reported either way)", choices=TRUNCATION_MODES, on_resume=SAME_DATA)
    packing: bool = _opt(False, "pack several examples per --context-length sequence, attention and positions "
                         "restricted to each example (docs/data.md)", on_resume=SAME_DATA)
    group_by_length: bool = _opt(False, "without --packing: batch examples of similar length together "
                                 "(less padding), batches still in a seeded random order", on_resume=SAME_DATA)
    eval_split: str = _opt("", "split to evaluate on (e.g. 'test'); exclusive with --eval-fraction", on_resume=SAME_DATA)
    eval_fraction: float = _opt(0.0, "hold out this fraction of the training split (seeded) for evaluation", on_resume=SAME_DATA)
    eval_every: int = _opt(0, "evaluate every N optimizer steps (and at the end); 0 = at the end only, "
                           "when there is an eval set")
    eval_batch_size: int = _opt(0, "sequences per rank per eval forward; 0 = --batch-size")
    output_dir: str = _opt("", "run directory; default runs/<model>-<timestamp>")
    model_cache_dir: str = _opt("", "where generated/downloaded models live; default $FSDP_QLORA_CACHE or ~/.cache/fsdp_qlora")
    trust_remote_code: bool = _opt(False, "allow model code from the hub (off unless you ask)")
    compute_dtype: str = _opt("auto", "dtype of the matmuls and activations (NF4 dequantizes into it; adapters, grads "
                              "and optimizer stay fp32): auto = bf16 where the device has it natively, fp16 on "
                              "GPUs without (with dynamic loss scaling), fp32 on CPUs without (train/precision.py)",
                              choices=COMPUTE_DTYPES)
    load_workers: int = _opt(4, "threads per rank reading its slices of the safetensors shards in parallel "
                             "(positioned reads, overlapped with quantization); 1 = one read at a time")
    # -- adapter --
    train_type: str = _opt("qlora", "qlora: NF4 base + LoRA; qdora: NF4 base + DoRA; lora / dora: bf16 base "
                           "(no quantization) + LoRA / DoRA (docs/adapters.md)", choices=TRAIN_TYPES, on_resume=SAME_SHAPE)
    lora_rank: int = _opt(8, "LoRA rank r", on_resume=SAME_SHAPE)
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --use-rslora)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = _opt(DEFAULT_TARGET_MODULES, "linear layers that get adapters: all-linear (every "
                                          "linear inside every decoder layer, whatever the architecture names it) or "
                                          "names matched against the end of module names (q_proj, self_attn.o_proj); "
                                          "a name that matches nothing is an error", on_resume=SAME_SHAPE)
    lora_target_regex: str = _opt("", "regex the full module name must match (e.g. 'model\\.layers\\.\\d+\\.mlp\\..*_proj'); "
                                  "replaces --lora-target-modules when set", on_resume=SAME_SHAPE)
    lora_target_parameters: list[str] = _opt([], "mixture-of-experts weights that get LoRA (PEFT's target_parameters): "
                                             "names matched against the end of '<module>.<weight>', e.g. "
                                             "experts.down_proj; all-linear already adapts every expert weight "
                                             "(LoRA only: PEFT has no DoRA on experts)", on_resume=SAME_SHAPE)
    lora_rank_pattern: list[str] = _opt([], "per-module rank overrides PATTERN=R, PATTERN a regex matching the end of "
                                       "the module name (PEFT's rank_pattern), e.g. down_proj=16", on_resume=SAME_SHAPE)
    lora_alpha_pattern: list[str] = _opt([], "per-module alpha overrides PATTERN=ALPHA (PEFT's alpha_pattern)")
    use_rslora: bool = _opt(False, "rank-stabilized LoRA: scale the update by alpha/sqrt(r) instead of alpha/r")
    loraplus_lr_ratio: float = _opt(1.0, "LoRA+: lora_B (and DoRA's magnitude) learn at --lr times this; 1 = off "
                                    "(the LoRA+ paper suggests 16)")
    # -- batch and schedule --
    batch_size: int = _opt(4, "sequences per rank per micro-step")
    grad_accum_steps: int = _opt(1, "micro-steps per optimizer step")
    context_length: int = _opt(512, "maximum tokens per sequence (longer examples are truncated)", on_resume=SAME_DATA)
    max_steps: int = _opt(-1, "optimizer steps; -1 = run --num-epochs epochs")
    num_epochs: int = _opt(1, "epochs over the dataset when --max-steps is -1")
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    warmup_steps: int = _opt(10, "linear warmup steps, then cosine decay to 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables")
    seed: int = _opt(42, "seed for adapter init, data order and dropout", on_resume=SAME_DATA)
    # -- logging --
    log_every: int = _opt(1, "log metrics every N optimizer steps")
    # -- checkpoints and failures --
    save_every: int = _opt(50, "save a sharded checkpoint every N optimizer steps (and always at the end); 0 = end only")
    keep_last: int = _opt(2, "complete checkpoints to keep; older ones are deleted")
    resume: str = _opt("auto", "auto (newest valid checkpoint in the output dir, if any), none, or a checkpoint path")
    async_save: bool = _opt(False, "write checkpoints in the background (DCP async_save) while training goes on")
    max_bad_steps: int = _opt(5, "abort (saving the last good state) after this many non-finite losses in a row")
    collective_timeout_s: float = _opt(600.0, "seconds before a hung collective (e.g. a dead rank) fails the job")
    # -- memory (docs/memory.md) --
    optimizer: str = _opt("adamw", "adamw (torch, fp32 state), adamw8bit (bitsandbytes, 8-bit blockwise state), "
                          "paged_adamw / paged_adamw8bit (bitsandbytes, state in CUDA unified memory; GPU only)",
                          choices=OPTIMIZERS, on_resume=SAME_SHAPE)
    min_8bit_size: int = _opt(4096, "8-bit optimizers: parameters with fewer elements (or whose shards are not whole "
                              "256-element blocks) keep 32-bit state, as in bitsandbytes", on_resume=SAME_SHAPE)
    loss_chunk_tokens: int = _opt(1024, "compute lm_head + cross-entropy this many tokens at a time, recomputed in "
                                  "backward, so the full fp32 logits never exist; 0 = all logits at once")
    activation_checkpointing: bool = _opt(False, "recompute decoder layers in backward instead of keeping their "
                                          "activations (non-reentrant checkpointing)")
    activation_checkpointing_every: int = _opt(1, "with --activation-checkpointing: checkpoint every N-th layer "
                                               "(1 = all; 2 = half the layers, less recomputation)")
    activation_offload: bool = _opt(False, "keep what the decoder layers save for backward in pinned host memory: "
                                    "a checkpointed layer's input, everything a non-checkpointed layer saves")
    cpu_offload: bool = _opt(False, "FSDP2 CPUOffloadPolicy: sharded params, grads and optimizer state in host "
                             "memory, copied to the GPU per layer (CUDA only)")
    reshard_after_forward: bool = _opt(True, "free each layer's all-gathered weights after its forward (and gather "
                                       "again in backward); --no-reshard-after-forward trades memory for speed")
    dequantize_once: bool | None = _opt(None, "keep each NF4 weight's dequantized copy from forward for backward "
                                        "instead of dequantizing it again: one dequantization per weight and step, "
                                        "for the memory of every layer's weights in the compute dtype until "
                                        "backward; unset (auto): on when the memory plan fits with it")
    fsdp_units: str = _opt("auto", "FSDP2 units: layer = one per decoder layer (gathered and freed layer by layer, "
                           "communication overlapped with compute); model = the layers in the root's unit (one "
                           "all-gather and one gradient reduction per step, the whole model gathered); auto = "
                           "model when the memory plan fits with it, else layer", choices=FSDP_UNITS)
    compile: bool = _opt(False, "torch.compile each decoder layer's forward (inductor, CPU and GPU): fused elementwise "
                         "work, less per-op overhead; the first steps are slower while it compiles")
    plan: bool = _opt(False, "print the per-GPU memory plan for these settings and exit without loading weights")
    gpu_memory_gib: float = _opt(0.0, "GPU memory per device for --plan, the fit warning and --sharding auto; 0 = "
                                 "the device's own (24 on a machine without a GPU; a CPU run plans nothing unless "
                                 "given)")
    # -- multi-GPU and multi-node (docs/multinode.md) --
    sharding: str = _opt("auto", "fsdp: shard over all ranks; hsdp: shard within a node, replicate across nodes; "
                         "ddp: full NF4 base on every rank, all-reduce adapter grads; auto: ddp when the memory plan of "
                         "the whole model fits each GPU, else hsdp on >1 node, else fsdp",
                         choices=SHARDING_TYPES)
    replicate_groups: int = _opt(0, "hsdp replica groups (the dp_replicate size); 0 = one per node, from "
                                 "WORLD_SIZE/LOCAL_WORLD_SIZE or SLURM_NNODES")
    rdzv_timeout_s: float = _opt(300.0, "seconds to wait for every rank at MASTER_ADDR:MASTER_PORT when ranks are "
                                 "started without torchrun (launch.slurm_env); torchrun uses its own --rdzv-conf")

    def validate(self) -> "TrainConfig":
        positive = ("lora_rank", "batch_size", "grad_accum_steps", "context_length", "num_epochs", "log_every",
                    "keep_last", "max_bad_steps", "collective_timeout_s", "rdzv_timeout_s", "load_workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be positive or -1 (use epochs), got {self.max_steps}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.save_every < 0:
            raise ConfigError(f"--save-every must be >= 0 (0 = save at the end only), got {self.save_every}")
        if self.replicate_groups < 0:
            raise ConfigError(f"--replicate-groups must be >= 0 (0 = one per node), got {self.replicate_groups}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.activation_checkpointing_every <= 0:
            raise ConfigError("--activation-checkpointing-every must be positive (1 = every layer), "
                              f"got {self.activation_checkpointing_every}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"--loss-chunk-tokens must be >= 0 (0 = unchunked), got {self.loss_chunk_tokens}")
        if self.gpu_memory_gib < 0:
            raise ConfigError(f"--gpu-memory-gib must be >= 0 (0 = the device's), got {self.gpu_memory_gib}")
        if not self.lora_target_modules:
            raise ConfigError("--lora-target-modules is empty: name at least one linear layer, e.g. q_proj")
        _validate_data_options(self)
        _validate_memory_options(self)
        if self.loraplus_lr_ratio <= 0:
            raise ConfigError(f"--loraplus-lr-ratio must be positive (1 = off), got {self.loraplus_lr_ratio}")
        for name, pattern in [("lora-target-regex", self.lora_target_regex),
                              *[("lora-rank-pattern", key) for key in self.rank_pattern()],
                              *[("lora-alpha-pattern", key) for key in self.alpha_pattern()]]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"--{name} {pattern!r} is not a valid regex ({err}): fix or quote it") from None
        return self

    def rank_pattern(self) -> dict[str, int]:
        return _patterns("lora-rank-pattern", self.lora_rank_pattern, int)

    def alpha_pattern(self) -> dict[str, float]:
        return _patterns("lora-alpha-pattern", self.lora_alpha_pattern, float)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _validate_data_options(cfg: TrainConfig) -> None:
    """The data flags that can be checked without reading the data (docs/data.md)."""
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.eval_split and cfg.eval_fraction:
        raise ConfigError("--eval-split and --eval-fraction both given: choose one eval set")
    if cfg.eval_every < 0 or cfg.eval_batch_size < 0 or cfg.dataset_num_proc < 0:
        raise ConfigError("--eval-every, --eval-batch-size and --dataset-num-proc must be >= 0")
    if cfg.eval_every and not (cfg.eval_split or cfg.eval_fraction):
        raise ConfigError(f"--eval-every {cfg.eval_every} needs an eval set: pass --eval-split or --eval-fraction")
    if cfg.dataset_streaming and cfg.max_steps == -1:
        raise ConfigError("--dataset-streaming has no known epoch length: set --max-steps")
    if cfg.dataset_streaming and cfg.eval_fraction:
        raise ConfigError("--eval-fraction cannot hold out part of a stream: use --eval-split with --dataset-streaming")
    if cfg.packing and cfg.group_by_length:
        raise ConfigError("--group-by-length has no effect with --packing (packed rows are all about "
                          "--context-length long): drop one of them")


def _validate_memory_options(cfg: TrainConfig) -> None:
    """Combinations that cannot do what they say (device-dependent ones: train/memory.py)."""
    if cfg.activation_checkpointing_every != 1 and not cfg.activation_checkpointing:
        raise ConfigError(f"--activation-checkpointing-every {cfg.activation_checkpointing_every} does nothing "
                          "without --activation-checkpointing: add it, or drop the option")
    if cfg.dataset_streaming and cfg.group_by_length:
        raise ConfigError("--group-by-length needs every example's length up front, which a stream does not "
                          "have: drop --group-by-length or --dataset-streaming")


def _patterns(flag: str, items: list[str], value_type: type) -> dict:
    """["down_proj=16", ...] -> {"down_proj": 16}, in the given order (PEFT: first match wins)."""
    result = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            number = value_type(value)
            if not sep or not pattern or number <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--{flag} entry {item!r} is not PATTERN=VALUE with a positive "
                              f"{value_type.__name__}: e.g. down_proj=16") from None
        result[pattern] = number
    return result


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def resume_fields(kind: str) -> list[str]:
    """The settings marked `on_resume=kind` (SAME_SHAPE or SAME_DATA), in field order."""
    return [f.name for f in config_fields() if f.metadata.get("on_resume") == kind]


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
        shown = ",".join(default) if isinstance(default, list) else "auto" if default is None else default
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,  # so only flags actually given override YAML/alias values
            "help": f"{f.metadata['help']} (default: {shown!r})",
        }
        if tp in (bool, bool | None):  # bool | None: unset means auto (the field's help says what decides)
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
        if tp == bool | None and value in (None, "auto"):
            return None
        if tp in (bool, bool | None):
            if not isinstance(value, bool):
                raise TypeError
            return value
        value = tp(value)
    except (TypeError, ValueError):
        expected = "true, false or auto" if tp == bool | None else getattr(tp, "__name__", tp)
        raise ConfigError(f"{name}: expected {expected}, got {value!r}") from None
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
    from fsdp_qlora.model.registry import recommended_settings

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
        "(`fsdp_qlora/model/registry.py`), `--config file.yaml`, then flags. The run's resolved",
        "settings are saved as `config.yaml` in its output directory, reusable with `--config`.",
        "",
        "| flag | YAML key | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in config_fields():
        tp = _field_type(f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ", ".join(default) if isinstance(default, list) else "auto" if default is None else repr(default)
        type_name = "list of names" if _is_list(tp) else "bool or auto" if tp == bool | None else getattr(tp, "__name__", str(tp))
        choices = f.metadata["choices"]
        meaning = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
        flag = f"`--{_flag(f.name)}`" + (f" / `--no-{_flag(f.name)}`" if tp in (bool, bool | None) else "")
        lines.append(f"| {flag} | `{f.name}` | {type_name} | `{shown}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
