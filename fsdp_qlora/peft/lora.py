"""LoRA adapters around frozen (possibly NF4-quantized) linear layers, numerically matching PEFT.

The math is PEFT's default LoRA (`init_lora_weights=True`, no bias):
``y = base(x) + lora_B(lora_A(dropout(x))) * scaling``, ``scaling = alpha / r`` (or ``alpha / sqrt(r)``
with rsLoRA), with the adapters kept in their own
dtype (fp32 by default) whatever the base computes in, and the result returned in the base
output's dtype. The module tree is plain `nn.Linear`s so FSDP2's `fully_shard` on an enclosing
decoder layer shards the adapter weights like any other parameter. DoRA is `peft/dora.py`.
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fsdp_qlora.config import ConfigError
from fsdp_qlora.model.structure import decoder_layers
from fsdp_qlora.peft.targets import select_targets

_V = TypeVar("_V")


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or with rsLoRA (Kalajdzievski 2023) alpha / sqrt(r): the rank-stabilized factor
    keeps the update's magnitude from shrinking as r grows, as PEFT's `use_rslora` does."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(name: str, patterns: dict[str, _V] | None, default: _V) -> _V:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first pattern matching the end of `name`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


class LoRALinear(nn.Module):
    """A frozen linear-like `base` (``forward(x) = x @ W^T [+ b]``, with `in_features` and
    `out_features` attributes) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        # Same module types as PEFT, so the RNG stream and state dict layout line up with it.
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        device = _module_device(base)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def materialize(self, device: torch.device) -> None:
        """Allocate the (meta) adapter parameters on `device`; values are garbage until reset."""
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default, i.e.
        U(-1/sqrt(in), 1/sqrt(in))), B = 0 so the adapter starts as an exact no-op.

        Without a generator this draws from the global RNG in place, exactly like PEFT. With one
        (a CPU generator), A is drawn on the CPU and copied in, so the values do not depend on
        the device or on how FSDP2 sharded the parameter.
        """
        with torch.no_grad():
            if generator is None:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            else:
                full = torch.empty(self.r, self.in_features, dtype=self.lora_A.weight.dtype)
                nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
                copy_full_into(self.lora_A.weight, full)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        delta = self.lora_B(self.lora_A(lora_x)) * self.scaling
        # Sum before casting back (PEFT's order): with a bf16 base this rounds once, not twice.
        return (result + delta).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, target_modules: list[str] | str, r: int, alpha: float, dropout: float,
               dtype: torch.dtype = torch.float32, *, use_rslora: bool = False, use_dora: bool = False,
               rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None) -> list[str]:
    """Wrap every submodule matching `target_modules` (PEFT's rule, `peft/targets.py`; `all-linear`:
    every linear layer inside the decoder layers) in a `LoRALinear`, or a `DoRALinear` with `use_dora`.

    `rank_pattern` / `alpha_pattern` override r / alpha per module, as PEFT's config fields do.
    Freezes every existing parameter; only the new adapters train. Works on a meta-device model
    (the adapters are created on meta too; materialize them, then call `init_lora_parameters`
    and, for DoRA, `init_dora_magnitudes` once the base weights are in).
    Returns the qualified names of the wrapped modules, in module order.
    """
    from fsdp_qlora.peft.dora import DoRALinear  # dora.py builds on this module

    modules = dict(model.named_modules())
    names = select_targets([name for name in modules if name], decoder_linear_names(model), target_modules)
    matched = [(name, modules[name]) for name in names]
    for name, module in matched:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter (apply_lora called twice?)")
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            raise ConfigError(f"{name} ({type(module).__name__}) is not a linear layer and cannot take LoRA: "
                              "name linear layers in --lora-target-modules (or pass all-linear)")

    model.requires_grad_(False)
    for name, module in matched:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer_cls = DoRALinear if use_dora else LoRALinear
        lora = layer_cls(module, pattern_value(name, rank_pattern, r), pattern_value(name, alpha_pattern, alpha),
                         dropout, dtype=dtype, use_rslora=use_rslora)
        lora.train(module.training)  # a new module starts in training mode: keep the model's mode
        setattr(parent, child_name, lora)
    return [name for name, _ in matched]


def init_lora_parameters(model: nn.Module, seed: int) -> None:
    """(Re)initialize every adapter from one seeded CPU generator, in module order.

    Needed after meta-device construction + `to_empty`, whose memory is garbage. The result is
    the same on every rank and device, before or after `fully_shard`.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora_parameters(generator)


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


def _module_device(module: nn.Module) -> torch.device:
    """Where `module` lives (meta included); a parameterless module counts as CPU."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy an unsharded CPU tensor into `param`, keeping only this rank's shard of a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full tensor, so slice locally, no comms.
        shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                  src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers (nn.Linear or NF4Linear: anything with in/out features)
    inside the model's decoder layers, in module order, adapters' own linears excluded; [] for a
    model without decoder layers."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return []
    prefix = next(name for name, module in model.named_modules() if module is layers)
    adapted = [name + "." for name, module in layers.named_modules() if isinstance(module, LoRALinear)]
    return [f"{prefix}.{name}" for name, module in layers.named_modules()
            if name and hasattr(module, "in_features") and hasattr(module, "out_features")
            and not isinstance(module, LoRALinear) and not name.startswith(tuple(adapted))]
