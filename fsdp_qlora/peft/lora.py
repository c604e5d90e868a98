"""LoRA adapters around frozen (possibly NF4-quantized) linear layers, numerically matching PEFT.

The math is PEFT's default LoRA (`init_lora_weights=True`, no bias):
``y = base(x) + lora_B(lora_A(dropout(x))) * scaling``, ``scaling = alpha / r`` (or ``alpha / sqrt(r)``
with rsLoRA), with the adapters kept in their own
dtype (fp32 by default) whatever the base computes in, and the result returned in the base
output's dtype. The module tree is plain `nn.Linear`s so FSDP2's `fully_shard` on an enclosing
decoder layer shards the adapter weights like any other parameter. DoRA is `peft/dora.py`; putting
adapters on a model is `peft/apply.py`.
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

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

    # The checkpoint's tensors of the wrapped module live in this child: the loader maps the HF key
    # `...q_proj.weight` to our `...q_proj.base.weight` by this attribute, without knowing LoRA.
    checkpoint_child = "base"
    compute_dtype: torch.dtype | None = None  # see `adapter_weight`

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
        device = module_device(base)
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
        lora_a, lora_b = adapter_weight(self, self.lora_A.weight), adapter_weight(self, self.lora_B.weight)
        lora_x = self.lora_dropout(x.to(lora_a.dtype))
        delta = F.linear(F.linear(lora_x, lora_a), lora_b) * self.scaling
        # Sum before casting back (PEFT's order): with a bf16 base this rounds once, not twice.
        return (result + delta).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def adapter_weight(adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An adapter's `weight` in the dtype its matmuls run in: `adapter.compute_dtype` when set, else the
    weight's own. Under FSDP2 the mixed-precision policy has already cast the fp32 adapters to the
    compute dtype; outside it (``--sharding ddp``, distributed/replicate.py) `compute_adapters_in` sets
    `compute_dtype`, and the same cast happens here, so both layouts compute alike, bit for bit. Left
    unset, fp32 adapters compute in fp32 as PEFT's do."""
    return weight if adapter.compute_dtype is None else weight.to(adapter.compute_dtype)


def module_device(module: nn.Module) -> torch.device:
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
