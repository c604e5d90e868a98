"""Mixture-of-experts layers: which modules hold experts, NF4 expert weights in them, and the forward.

transformers (v5) gives every MoE architecture one experts module per layer that holds its
experts as fused 3-D parameters (``gate_up_proj`` ``(experts, 2 * inter, hidden)``, ``down_proj``
``(experts, hidden, inter)``; transposed, with biases, and gate/up interleaved in gpt-oss), and
dispatches that module's forward through `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS` on
``config._experts_implementation``, with the layout flags the class declares (`is_transposed`,
`has_bias`, `has_gate`, ...). The module stays transformers' own: the loader puts `NF4Experts`
(model/nf4_experts.py) in its 3-D parameters and registers `experts_forward` as the implementation
"fsdp_qlora". The router (a 2-D parameter) is never quantized.

`experts_forward` is transformers' eager loop (the reference the tests compare against), with
each expert's weight dequantized just before its matmul and freed after it: a layer never holds
more than one expert's projection in the compute dtype, and backward dequantizes it again instead
of keeping it (as `NF4Linear` does). Adapters on the experts (peft/experts_lora.py) are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.layout import NF4_BLOCKSIZE
from fsdp_qlora.model.nf4_experts import NF4Experts

IMPLEMENTATION = "fsdp_qlora"
# Layout flags of transformers' experts classes that `experts_forward` implements; a class declaring
# another (has_gate=False, a post-expert norm) is refused by `check_experts`, not run wrongly.
_SUPPORTED_FLAGS = {"has_gate": True, "has_post_expert_norm": False}


def expert_params(module: nn.Module) -> list[str]:
    """The module's own 3-D parameters (fused expert weights), in registration order ([] if none)."""
    return [name for name, param in module.named_parameters(recurse=False) if param.ndim == 3]


def experts_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every experts module under `root` (an adapter wrapper's child included)."""
    return [(name, module) for name, module in root.named_modules()
            if expert_params(module) or getattr(module, "expert_shapes", None)]


def expert_shapes(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Logical ``(experts, a, b)`` of each fused expert parameter, also once quantized (packed NF4
    parameters are ``(experts, a, b // 2)`` bytes)."""
    recorded = getattr(module, "expert_shapes", None)
    if recorded:
        return dict(recorded)
    return {name: tuple(getattr(module, name).shape) for name in expert_params(module)}


def expert_in_out(shape: tuple[int, int, int], transposed: bool) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of a fused expert weight of logical `shape`: an expert
    computes ``x @ W_e^T`` with ``W_e`` ``(out, in)``, or ``x @ W_e`` with ``(in, out)`` when its class
    is `is_transposed` (gpt-oss). PEFT's ParamWrapper reads them the same way."""
    experts, a, b = shape
    return (experts, a, b) if transposed else (experts, b, a)


def check_experts(model_type: str, name: str, module: nn.Module) -> None:
    """Refuse, in one line, an experts class whose layout `experts_forward` does not implement."""
    for flag, supported in _SUPPORTED_FLAGS.items():
        if getattr(module, flag, supported) != supported:
            raise ConfigError(f"model_type {model_type!r}: {name} ({type(module).__name__}) has the unsupported "
                              f"expert layout {flag}={getattr(module, flag)}; fsdp_qlora fine-tunes experts with "
                              "fused gate_up_proj/down_proj weights")
    params = expert_params(module) or list(expert_shapes(module))
    if sorted(params) != ["down_proj", "gate_up_proj"]:
        raise ConfigError(f"model_type {model_type!r}: {name} ({type(module).__name__}) holds the expert weights "
                          f"{', '.join(params)}; fsdp_qlora fine-tunes experts with fused gate_up_proj/down_proj weights")
    if not hasattr(module, "is_transposed"):
        raise ConfigError(f"model_type {model_type!r}: {name} ({type(module).__name__}) holds 3-D weights but is "
                          "not a transformers experts class (no @use_experts_implementation): cannot load it")


def quantize_experts(name: str, module: nn.Module, shard_count: int) -> None:
    """Replace the module's fused expert weights (on meta) by NF4 placeholders, sharded by experts."""
    shapes = expert_shapes(module)
    for param_name, (experts, rows, cols) in shapes.items():
        if experts % shard_count:
            raise ConfigError(f"{name}.{param_name}: {experts} experts cannot be split evenly over {shard_count} "
                              f"ranks (each rank holds whole NF4 experts); use a world size that divides {experts}")
        if cols % 2 or rows * cols % NF4_BLOCKSIZE:
            raise ConfigError(f"{name}.{param_name}: an expert's {rows}x{cols} weight is not a whole number of "
                              f"{NF4_BLOCKSIZE}-element NF4 blocks")
        placeholder = torch.empty(experts, rows, cols // 2, dtype=torch.uint8, device="meta")
        setattr(module, param_name, nn.Parameter(placeholder, requires_grad=False))
    module.expert_shapes = shapes


def use_our_experts_forward(model: nn.Module) -> None:
    """Dispatch every experts module of `model` to `experts_forward` (it computes dense experts too)."""
    model.config._experts_implementation = IMPLEMENTATION


# ---- the forward ----------------------------------------------------------------------------
class _ExpertMatmul(torch.autograd.Function):
    """x @ W_e^T (or x @ W_e for transposed layouts) with W_e = expert `index` of an NF4Experts,
    dequantized in forward and again in backward (nothing the size of a weight is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: NF4Experts, index: int, transposed: bool) -> torch.Tensor:
        ctx.experts, ctx.index, ctx.transposed = experts, index, transposed
        weight = experts.expert(index).dequantize(x.dtype)
        return x @ weight if transposed else F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.experts.expert(ctx.index).dequantize(grad_output.dtype)
        grad_x = grad_output @ weight.t() if ctx.transposed else grad_output @ weight
        return grad_x, None, None, None


def _project(module: nn.Module, name: str, index: int, x: torch.Tensor, adapters: Mapping[str, nn.Module] | None):
    """One expert's projection `name` of `x`: the base (NF4 or dense), its bias, then its adapter."""
    weight = getattr(module, name)
    transposed = module.is_transposed
    if isinstance(weight, NF4Experts):
        out = _ExpertMatmul.apply(x, weight, index, transposed)
    else:
        out = x @ weight[index] if transposed else F.linear(x, weight[index])
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[index]
    if adapters is not None and name in adapters:
        out = adapters[name](x, index, out)
    return out


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, adapters: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
    """transformers' eager experts loop (MixtralExperts.forward, GptOssExperts.forward): each expert that
    received tokens computes them, one at a time, in the same operations, so dense weights give
    transformers' eager results bit for bit."""
    final = torch.zeros_like(hidden_states)
    num_experts = module.num_experts
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for (index,) in expert_hit.tolist():
        if index == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[index])
        current = hidden_states[token_idx]
        gated = module._apply_gate(_project(module, "gate_up_proj", index, current, adapters))
        out = _project(module, "down_proj", index, gated, adapters)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
