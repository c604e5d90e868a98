"""Putting adapters on a model: which modules (peft/targets.py), LoRA or DoRA layers, their init,
and their optimizer groups. The settings come as one `AdapterSpec` (peft/spec.py).
"""

from __future__ import annotations

import torch
from torch import nn

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.experts import expert_shapes, experts_modules
from fsdp_qlora.model.registry import is_router
from fsdp_qlora.model.structure import decoder_layers
from fsdp_qlora.peft.dora import DoRALinear
from fsdp_qlora.peft.experts_lora import ExpertLoRA, LoRAExperts
from fsdp_qlora.peft.lora import LoRALinear, pattern_value
from fsdp_qlora.peft.spec import AdapterSpec
from fsdp_qlora.peft.targets import select_expert_targets, select_targets

# The modules holding trainable adapter factors: built on meta, materialized and initialized alike.
ADAPTER_LAYERS = (LoRALinear, ExpertLoRA)


def apply_lora(model: nn.Module, spec: AdapterSpec, dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap every submodule `spec.targets` names (PEFT's rule, peft/targets.py; `all-linear`: every
    linear layer inside the decoder layers) in a `LoRALinear`, or a `DoRALinear` with `spec.use_dora`.

    `spec.rank_pattern` / `alpha_pattern` override r / alpha per module, as PEFT's config fields do.
    Freezes every existing parameter; only the new adapters train. Works on a meta-device model
    (the adapters are created on meta too; materialize them, then call `init_lora_parameters`
    and, for DoRA, `init_dora_magnitudes` once the base weights are in).
    Returns the qualified names of the wrapped modules, in module order.
    """
    modules = dict(model.named_modules())
    names = select_targets([name for name in modules if name], decoder_linear_names(model), spec.target_modules)
    matched = [(name, modules[name]) for name in names]
    for name, module in matched:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter (apply_lora called twice?)")
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            raise ConfigError(f"{name} ({type(module).__name__}) is not a linear layer and cannot take LoRA: "
                              "name linear layers in --lora-target-modules (or pass all-linear)")

    model.requires_grad_(False)
    layer_cls = DoRALinear if spec.use_dora else LoRALinear
    for name, module in matched:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = layer_cls(module, pattern_value(name, spec.rank_pattern, spec.r),
                         pattern_value(name, spec.alpha_pattern, spec.alpha), spec.dropout, dtype=dtype,
                         use_rslora=spec.use_rslora)
        lora.train(module.training)  # a new module starts in training mode: keep the model's mode
        setattr(parent, child_name, lora)
    return [name for name, _ in matched] + _apply_expert_lora(model, spec, dtype)


def _apply_expert_lora(model: nn.Module, spec: AdapterSpec, dtype: torch.dtype) -> list[str]:
    """Wrap the experts modules whose fused weights `spec` targets in a `LoRAExperts`; returns the
    qualified names of the adapted weights (``...mlp.experts.gate_up_proj``)."""
    weights = [f"{name}.{param}" for name, module in experts_modules(model) for param in expert_shapes(module)]
    chosen = select_expert_targets(weights, spec.target_modules, list(spec.target_parameters), spec.use_dora)
    for name, module in experts_modules(model):
        params = [param for param in expert_shapes(module) if f"{name}.{param}" in chosen]
        if not params:
            continue
        parent_name, _, child_name = name.rpartition(".")
        wrapper = LoRAExperts(module, params, spec.r, spec.alpha, dtype, spec.use_rslora)
        wrapper.train(module.training)
        setattr(model.get_submodule(parent_name), child_name, wrapper)
    return chosen


def init_lora_parameters(model: nn.Module, seed: int) -> None:
    """(Re)initialize every adapter from one seeded CPU generator, in module order.

    Needed after meta-device construction + `to_empty`, whose memory is garbage. The result is
    the same on every rank and device, before or after `fully_shard`.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, ADAPTER_LAYERS):
            module.reset_lora_parameters(generator)


def compute_adapters_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Run every adapter's matmuls in `dtype`, its weights cast at each use (peft/lora.py
    `adapter_weight`): for adapters that no FSDP2 mixed-precision policy casts (``--sharding ddp``)."""
    for module in model.modules():
        if isinstance(module, ADAPTER_LAYERS):
            module.compute_dtype = dtype


def adapter_param_groups(model: nn.Module, loraplus_lr_ratio: float, lr: float) -> list[dict]:
    """The trainable parameters as optimizer groups. With LoRA+ (Hayou et al. 2024,
    `loraplus_lr_ratio` != 1) B learns at lr * ratio; like PEFT's `create_loraplus_optimizer`, 1-D
    adapter parameters (DoRA's magnitude) go with B."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio == 1.0:
        return [{"params": [p for _, p in params]}]
    fast = [p for name, p in params if ".lora_B." in name or p.ndim == 1]
    slow = [p for name, p in params if not (".lora_B." in name or p.ndim == 1)]
    return [{"params": slow}, {"params": fast, "lr": lr * loraplus_lr_ratio}]


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers (nn.Linear or NF4Linear: anything with in/out features)
    inside the model's decoder layers, in module order, adapters' own linears and the architecture's
    router linears excluded; [] for a model without decoder layers."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return []
    prefix = next(name for name, module in model.named_modules() if module is layers)
    adapted = [name + "." for name, module in layers.named_modules() if isinstance(module, (LoRALinear, LoRAExperts))]
    return [f"{prefix}.{name}" for name, module in layers.named_modules()
            if name and hasattr(module, "in_features") and hasattr(module, "out_features")
            and not isinstance(module, ADAPTER_LAYERS) and not name.startswith(tuple(adapted))
            and not is_router(model.config.model_type, name)]
