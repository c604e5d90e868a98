"""Save/load LoRA/DoRA adapters in PEFT's on-disk format, so `PeftModel.from_pretrained` reads them.

What is written (docs/adapters.md): ``lora_A``/``lora_B`` weights, plus ``lora_magnitude_vector``
per module for DoRA (``use_dora: true``); ``use_rslora`` when the scale is alpha/sqrt(r); an
explicit ``target_modules`` list; no ``modules_to_save``. Plain LoRA adapters thus also meet the
rules vLLM applies when loading an adapter; vLLM refuses DoRA, whose serving path is a merged
model (tools/merge_adapter.py).

peft itself is only a test dependency: the config and key names are written here by hand and
the tests check that PEFT reads them back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fsdp_qlora.peft.experts_lora import EXPERT_LORA
from fsdp_qlora.peft.lora import copy_full_into
from fsdp_qlora.peft.spec import AdapterSpec
from fsdp_qlora.peft.targets import is_all_linear, linear_names

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# Name components added by FSDP(1), activation checkpointing and torch.compile; none of them is
# part of the Hugging Face module path that PEFT keys refer to.
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_LORA_WEIGHTS = frozenset({"lora_A", "lora_B"})
DORA_MAGNITUDE = "lora_magnitude_vector"  # a Parameter of its module, saved without ".weight" by PEFT
# PeftModel wraps a LoraModel (`base_model`) wrapping the HF model (`model`).
PEFT_KEY_PREFIX = "base_model.model."


def peft_keys(names: list[str]) -> dict[str, str]:
    """Our adapter tensor names -> PEFT's keys, for the LoRA A/B weights (and DoRA magnitudes) among `names`.

    ``_orig_mod.model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.lora_A.weight`` becomes
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (PEFT saves without the
    adapter name); the `base.` inside our wrappers never appears, only A/B are kept. Expert adapters
    (``mlp.experts.expert_lora.gate_up_proj.lora_A.weight``, peft/experts_lora.py) take the key of
    PEFT's ParamWrapper, which nests one wrapper per adapted weight of a module, the module's first
    adapted weight innermost: with gate_up_proj and down_proj adapted, gate_up_proj's factors are
    ``mlp.experts.base_layer.lora_A.weight`` and down_proj's ``mlp.experts.lora_A.weight``.
    """
    parts_of = {name: [part for part in name.split(".") if part not in _WRAPPER_COMPONENTS] for name in names}
    adapted_weights: dict[str, list[str]] = {}  # experts module -> its adapted weights, in order
    for parts in parts_of.values():
        if len(parts) >= 5 and parts[-4] == EXPERT_LORA:
            module, weight = ".".join(parts[:-4]), parts[-3]
            if weight not in adapted_weights.setdefault(module, []):
                adapted_weights[module].append(weight)
    keys: dict[str, str] = {}
    for name, parts in parts_of.items():
        is_lora = len(parts) >= 3 and parts[-2] in _LORA_WEIGHTS and parts[-1] == "weight"
        if len(parts) >= 5 and parts[-4] == EXPERT_LORA and is_lora:
            module, weight = ".".join(parts[:-4]), parts[-3]
            order = adapted_weights[module]
            parts = [*parts[:-4], *["base_layer"] * (len(order) - 1 - order.index(weight)), *parts[-2:]]
        elif not (is_lora or (len(parts) >= 2 and parts[-1] == DORA_MAGNITUDE)):
            continue
        keys[name] = PEFT_KEY_PREFIX + ".".join(parts)
    return keys


def adapter_state_dict(named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick the adapter tensors out of `named_tensors`, renamed to PEFT's keys (`peft_keys`)."""
    result: dict[str, torch.Tensor] = {}
    for name, key in peft_keys(list(named_tensors)).items():
        if key in result:
            raise ValueError(f"two tensors map to the PEFT key {key} (the second is {name})")
        result[key] = named_tensors[name]
    if not result:
        raise ValueError(f"no lora_A/lora_B weights among {len(named_tensors)} tensors; "
                         f"first names: {list(named_tensors)[:5]}")
    return result


def expert_target_parameters(named_tensors: list[str]) -> list[str]:
    """PEFT's `target_parameters` for the expert adapters among our tensor names: ``experts.gate_up_proj``
    (the experts module's last name component and the weight), sorted."""
    found = set()
    for name in named_tensors:
        parts = [part for part in name.split(".") if part not in _WRAPPER_COMPONENTS]
        if len(parts) >= 5 and parts[-4] == EXPERT_LORA:
            found.add(f"{parts[-5]}.{parts[-3]}")
    return sorted(found)


def adapted_modules(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The qualified names (in the HF model) of the modules a PEFT-keyed adapter touches (an experts
    module once, without PEFT's `base_layer` nesting)."""
    return sorted({key.removeprefix(PEFT_KEY_PREFIX).rsplit(".lora_", 1)[0].replace(".base_layer", "")
                   for key in state_dict})


def peft_adapter_config(spec: AdapterSpec, base_model_name_or_path: str, target_modules: list[str],
                        target_parameters: list[str] = ()) -> dict:
    """The `adapter_config.json` content PEFT writes for LoRA/DoRA on a causal LM.

    Only fields PEFT has had since 0.10 are written, so older PEFT versions load it too; newer
    fields take their defaults, which are all "off". `target_modules` is always a list (never
    PEFT's regex form): vLLM and other loaders need the names. Adapters on expert weights add
    `target_parameters` (PEFT >= 0.17), and then `lora_dropout` is 0: PEFT refuses dropout with
    parameter adapters, and dropout does nothing at inference anyway.
    """
    extra = {"target_parameters": sorted(set(target_parameters))} if target_parameters else {}
    return {**extra,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0 if target_parameters else spec.dropout,
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "layer_replication": None,
        "auto_mapping": None,
    }


def save_peft_adapter(output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor], spec: AdapterSpec,
                      base_model_name_or_path: str, target_modules: list[str], target_parameters: list[str] = ()) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` into `output_dir`.

    `state_dict` is `adapter_state_dict`'s output. Both files are written to a sibling temp dir
    which then replaces `output_dir` as a whole, so a crash mid-save leaves the previous adapter
    intact (never a new config next to old or half-written weights).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(spec, base_model_name_or_path, target_modules, target_parameters)
    # safetensors needs contiguous CPU tensors; fp32 is what PEFT would load into fp32 adapters.
    tensors = {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in state_dict.items()}

    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the final dir should be a normal one
        save_file(tensors, staging / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def load_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: (adapter_config.json as a dict, PEFT-keyed CPU tensors)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
    missing = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if not (adapter_dir / name).is_file()]
    if missing:
        present = sorted(path.name for path in adapter_dir.iterdir())
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter: missing {missing} (found {present})")
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    return config, load_file(adapter_dir / ADAPTER_WEIGHTS_NAME)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is set aside first and deleted only after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    shutil.rmtree(old)


def export_trained_adapter(output_dir: str | os.PathLike, full_tensors: dict[str, torch.Tensor], spec: AdapterSpec,
                           base_model_path: str) -> Path:
    """The run's adapter in PEFT format, from full (unsharded) adapter tensors named as in our
    model. One path for train.py and tools/.

    `target_modules` is always a list of names (never PEFT's regex or `all-linear` shorthand), so
    every loader that reads the names can apply it: the given names; for `all-linear` the names of
    the linears it adapted (in every layer alike); for a regex the qualified names it matched."""
    state_dict = adapter_state_dict(full_tensors)
    target_parameters = expert_target_parameters(list(full_tensors))
    expert_keys = {key for name, key in peft_keys(list(full_tensors)).items() if f".{EXPERT_LORA}." in name}
    modules = {key: tensor for key, tensor in state_dict.items() if key not in expert_keys}  # target_modules'
    if isinstance(spec.targets, str):
        targets = adapted_modules(modules)
    elif is_all_linear(spec.target_modules):
        targets = linear_names(adapted_modules(modules))
    else:
        targets = sorted(set(spec.targets))
    return save_peft_adapter(output_dir, state_dict, spec, base_model_path, targets, target_parameters)


def install_adapter(model: nn.Module, peft_state: dict[str, torch.Tensor]) -> None:
    """Copy a PEFT-keyed adapter (full tensors) into the model's (sharded) adapter parameters."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ours = {key: trainable[name] for name, key in peft_keys(list(trainable)).items()}
    missing, unexpected = sorted(set(ours) - set(peft_state)), sorted(set(peft_state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                         "check --lora-target-modules and the base model")
    with torch.no_grad():
        for key, param in ours.items():
            full = peft_state[key]
            if tuple(full.shape) != tuple(param.shape):
                raise ValueError(f"adapter tensor {key} has shape {tuple(full.shape)}, the model expects "
                                 f"{tuple(param.shape)}: check --lora-rank and the base model")
            copy_full_into(param, full.to(param.dtype))
