"""Which modules get adapters: PEFT's `target_modules` rules, plus `all-linear`, checked so that nothing
is silently left out. Torch-free: the layers and the memory planner apply the same rule to names.
"""

from __future__ import annotations

import re
from collections import Counter

from fsdp_qlora.errors import ConfigError

# PEFT's shorthand: every linear layer but the output head. Here: every linear inside every decoder
# layer, whatever the architecture calls it (q_proj, qkv_proj, gate_up_proj, c_fc, ...).
ALL_LINEAR = "all-linear"


def target_matches(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex the whole qualified module name must match; a list names
    modules by their trailing name components (``q_proj`` or ``self_attn.q_proj``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def is_all_linear(target_modules: list[str] | str) -> bool:
    return target_modules == ALL_LINEAR or (isinstance(target_modules, list) and ALL_LINEAR in target_modules)


def peft_target_modules(target_modules: list[str] | str) -> list[str] | str:
    """Our targets as PEFT's LoraConfig spells them: our ["all-linear"] is PEFT's string shorthand."""
    return ALL_LINEAR if is_all_linear(target_modules) else target_modules


def select_targets(module_names: list[str], decoder_linears: list[str], target_modules: list[str] | str) -> list[str]:
    """The qualified names that get adapters, in module order.

    `module_names`: every module of the model; `decoder_linears`: the linear layers inside its decoder
    layers (what `all-linear` means). An explicit target that matches no module is an error naming
    the linear layers the model has, so a name from another architecture (q_proj on Phi-3's fused
    qkv_proj) cannot silently leave layers unadapted.
    """
    if is_all_linear(target_modules):
        if isinstance(target_modules, list) and len(target_modules) > 1:
            raise ConfigError(f"--lora-target-modules {','.join(target_modules)}: {ALL_LINEAR} already names every "
                              "linear layer of the decoder layers; pass it alone or list names instead")
        return list(decoder_linears)
    have = linear_names(decoder_linears)
    if isinstance(target_modules, str):
        matched = [name for name in module_names if target_matches(name, target_modules)]
        if not matched:
            raise ConfigError(f"--lora-target-regex {target_modules!r} matches no module of this model; its decoder "
                              f"linear layers are {', '.join(have)} (e.g. {decoder_linears[0] if decoder_linears else '-'})")
        return matched
    for target in target_modules:
        if not any(target_matches(name, [target]) for name in module_names):
            raise ConfigError(f"--lora-target-modules: no module of this model is named {target!r}; its decoder "
                              f"linear layers are {', '.join(have)} (or pass {ALL_LINEAR})")
    return [name for name in module_names if target_matches(name, target_modules)]


def linear_names(qualified: list[str]) -> list[str]:
    """The distinct last name components (``q_proj``), sorted: what a PEFT adapter's target_modules lists."""
    return sorted({name.rsplit(".", 1)[-1] for name in qualified})


def count_by_name(qualified: list[str]) -> str:
    """``q_proj x30, k_proj x30, ...`` in first-seen order: what the run logs about its adapters."""
    counts = Counter(name.rsplit(".", 1)[-1] for name in qualified)
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def select_expert_targets(expert_weights: list[str], target_modules: list[str] | str, target_parameters: list[str],
                          use_dora: bool) -> list[str]:
    """The fused expert weights (qualified ``<module>.<weight>`` names) that get adapters, in order.

    `all-linear` adapts every expert weight (they are the experts' linear layers); `target_parameters`
    (PEFT's rule: a name equal to, or ending in ``.`` + , the target) adds more. A target matching
    nothing is an error naming the expert weights the model has. PEFT has no DoRA on expert weights,
    so with DoRA they get none (and naming one is an error)."""
    have = sorted({".".join(name.rsplit(".", 2)[-2:]) for name in expert_weights})
    for target in target_parameters:
        if not any(name == target or name.endswith("." + target) for name in expert_weights):
            raise ConfigError(f"--lora-target-parameters: no expert weight of this model is named {target!r}; its "
                              f"expert weights are {', '.join(have) or 'none (not a mixture-of-experts model)'}")
    if use_dora:
        if target_parameters:
            raise ConfigError("--lora-target-parameters with DoRA: PEFT adapts expert weights with LoRA only, so "
                              "such an adapter could not be loaded; use --train-type qlora or drop the expert targets")
        return []
    every = is_all_linear(target_modules)
    return [name for name in expert_weights
            if every or any(name == target or name.endswith("." + target) for target in target_parameters)]
