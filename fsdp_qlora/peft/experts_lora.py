"""LoRA on mixture-of-experts weights, in the layout PEFT's `target_parameters` (`lora.ParamWrapper`) uses.

PEFT (>= 0.17) adapts a fused expert parameter ``(experts, a, b)`` with one pair of linears for all
experts: ``lora_A: (r * experts, in)`` and ``lora_B: (out, r * experts)``; expert e's factors are
``A_e = lora_A.view(experts, r, in)[e]`` and ``B_e = lora_B.view(out, r, experts)[:, :, e]``, and its
update is ``scaling * B_e @ A_e`` on the ``(out, in)`` weight (``(in, out)`` is the stored order
when the experts class is `is_transposed`, as in gpt-oss; in/out are what the expert computes).
The tensors here have exactly those shapes, so export is a renaming (peft/export.py) and PEFT's
own loader checks them.

The computation differs from PEFT's in one way that does not change the function: PEFT adds the
update to the weight before the matmul (a parametrization); here the update is applied to each
expert's tokens as ``(x @ A_e^T) @ B_e^T`` next to the (NF4) base matmul, like LoRA on a linear,
which never forms a dense ``(out, in)`` update nor its gradient. No dropout: PEFT defines none
for parameter adapters (it cannot be factored out of a merged weight), so an exported adapter
means the same thing in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_qlora.model.experts import expert_in_out, expert_shapes, experts_forward
from fsdp_qlora.peft.lora import adapter_weight, copy_full_into, lora_scaling, module_device

# The attribute holding an experts module's adapters; export recognizes expert adapters by it.
EXPERT_LORA = "expert_lora"


class ExpertLoRA(nn.Module):
    """LoRA factors of every expert of one fused weight (PEFT's ParamWrapper layout)."""

    compute_dtype: torch.dtype | None = None  # see peft/lora.py `adapter_weight`

    def __init__(self, experts: int, in_features: int, out_features: int, r: int, lora_alpha: float,
                 dtype: torch.dtype = torch.float32, use_rslora: bool = False, device=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.experts, self.in_features, self.out_features, self.r = experts, in_features, out_features, r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_A = nn.Linear(in_features, r * experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def materialize(self, device: torch.device) -> None:
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init of a ParamWrapper: kaiming_uniform(a=sqrt(5)) on the whole ``(r * experts, in)``
        lora_A (fan-in = in), lora_B = 0; drawn on the CPU from `generator` when given (see LoRALinear)."""
        with torch.no_grad():
            if generator is None:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            else:
                full = torch.empty(self.r * self.experts, self.in_features, dtype=self.lora_A.weight.dtype)
                nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
                copy_full_into(self.lora_A.weight, full)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, index: int, base_out: torch.Tensor) -> torch.Tensor:
        """Expert `index`'s output `base_out` for tokens `x`, plus its low-rank update."""
        # this expert's slices, then cast (`adapter_weight`): not every expert's factors at every call
        lora_a = adapter_weight(self, self.lora_A.weight.view(self.experts, self.r, self.in_features)[index])
        lora_b = adapter_weight(self, self.lora_B.weight.view(self.out_features, self.r, self.experts)[:, :, index])
        delta = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * self.scaling
        return (base_out + delta).to(base_out.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, in={self.in_features}, out={self.out_features}, r={self.r}"


class LoRAExperts(nn.Module):
    """A transformers experts module (`base`) with adapters on some of its fused weights."""

    checkpoint_child = "base"  # the loader maps ...experts.base.gate_up_proj to the checkpoint's ...experts.gate_up_proj

    def __init__(self, base: nn.Module, params: list[str], r: int, lora_alpha: float, dtype: torch.dtype = torch.float32,
                 use_rslora: bool = False):
        super().__init__()
        self.base = base
        device = module_device(base)
        self.expert_lora = nn.ModuleDict({
            param: ExpertLoRA(*expert_in_out(shape, base.is_transposed), r, lora_alpha, dtype, use_rslora, device)
            for param, shape in expert_shapes(base).items() if param in params})  # the base's order: PEFT's nesting order

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return experts_forward(self.base, hidden_states, top_k_index, top_k_weights, adapters=self.expert_lora)
