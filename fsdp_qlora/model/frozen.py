"""The one interface adapters use to reach a frozen base weight, whatever holds it.

A frozen base is a linear-like module (`in_features`, `out_features`, `bias`) that can give its
weight as a dense ``(out, in)`` tensor in a dtype and compute with a dense weight the caller
already has, so that DoRA dequantizes an NF4 weight once per forward for its matmul and its norm.
`NF4Linear` implements it (`dense_weight`, `forward(x, dense_weight)`, `matmul`); a plain
`nn.Linear` (the bf16 base of lora/dora) is served by the fallbacks below. A new kind of frozen
base (quantized experts, say) implements the three methods; LoRA and DoRA do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


def dense_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base's weight as a dense ``(out, in)`` tensor: what the base computes with (under
    FSDP2 during forward: the gathered weight; otherwise this rank's rows)."""
    if hasattr(base, "dense_weight"):
        return base.dense_weight(dtype)
    weight = base.weight
    return weight.to_local() if isinstance(weight, DTensor) else weight  # a dense base keeps its own dtype


def forward(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base(x)`` computed with `weight` (from `dense_weight`), bias included."""
    if hasattr(base, "dense_weight"):
        return base(x, dense_weight=weight)
    return F.linear(x, weight, base.bias)


def matmul(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` without the bias, in the way that suits the base (an NF4 base does not keep
    `weight` for backward: it dequantizes again)."""
    if hasattr(base, "matmul"):
        return base.matmul(x, weight)
    return F.linear(x, weight)


def weight_loaded(base: nn.Module) -> bool:
    """Whether the base holds real weights yet (not a meta or placeholder tensor)."""
    if hasattr(base, "weight_loaded"):
        return base.weight_loaded()
    weight = getattr(base, "weight", None)
    if weight is None or weight.is_meta:
        return False
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    return local.is_floating_point() and not local.is_meta
