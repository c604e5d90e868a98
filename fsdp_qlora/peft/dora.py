"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") on any frozen base (the interface
of `model/frozen.py`: NF4 or dense), numerically following PEFT's `DoraLinearLayer`.

The adapted weight is ``W' = m * (W + s·B·A) / ||W + s·B·A||_row``: a trainable magnitude ``m``
per output feature times the unit-norm direction of the LoRA-updated weight. As in PEFT (and
section 4.3 of the paper) the norm is detached: it scales the output but gets no gradient. The
output is then computed without forming W', in PEFT's order::

    scale = m / ||W + s·B·A||_row
    y = base(x) + (scale - 1) * (x @ W^T) + scale * s * B(A(dropout(x)))

`m` is initialized to the row norms of the (dequantized) base weight, so a fresh adapter (B = 0)
is a no-op. It lives in the parameter ``lora_magnitude_vector``, the name PEFT saves it under,
and is sharded by FSDP2 along dim 0 together with the layer.

The weight norm without the ``out x in`` product B·A (see `dora_weight_norm`): PEFT forms
``W + s·B·A`` in full precision, which for a 70B MLP projection is hundreds of MB per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp_qlora.model import frozen
from fsdp_qlora.peft.lora import LoRALinear, adapter_weight, copy_full_into, module_device

# fp32 elements of W converted at a time for the norm (64 MiB): bounds the transient copy
# whatever the layer's size, and is a single block for all but the largest projections.
_NORM_BLOCK_ELEMENTS = 1 << 24


@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                     scaling: float = 1.0) -> torch.Tensor:
    """``||W + s·B·A||`` per row, in fp32, never materializing ``B·A`` (out x in); ``||W||`` per
    row without an update (A, B = None).

    Expanding the square of row i:
        ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2s·<B_i, (W Aᵀ)_i> + s^2·B_i (A Aᵀ) B_iᵀ
    needs only ``W Aᵀ`` (out x r) and ``A Aᵀ`` (r x r). W itself is read once, in row blocks
    converted to fp32 (`_NORM_BLOCK_ELEMENTS`), so the extra memory is O(out·r) plus one block
    instead of a full-precision out x in matrix, and the result keeps fp32 accuracy (PEFT's
    reference computes in the adapters' fp32 too). The three terms are all sums of products of
    the same rows; rounding can make the total a hair below 0 only if W + s·B·A has an exactly
    zero row, hence the clamp.
    """
    rows_per_block = max(1, _NORM_BLOCK_ELEMENTS // weight.shape[1])
    no_update = lora_A is None or lora_B is None
    a = None if no_update else lora_A.detach().float()
    b = None if no_update else lora_B.detach().float()
    squares, cross = [], []
    for start in range(0, weight.shape[0], rows_per_block):
        block = weight[start:start + rows_per_block].float()  # one fp32 block alive at a time
        squares.append((block * block).sum(dim=1))
        if not no_update:
            cross.append((b[start:start + rows_per_block] * (block @ a.T)).sum(dim=1))
    if no_update:
        return torch.cat(squares).sqrt()
    lora_square = ((b @ (a @ a.T)) * b).sum(dim=1)
    total = torch.cat(squares) + 2 * scaling * torch.cat(cross) + scaling * scaling * lora_square
    return total.clamp_min(0).sqrt()


class DoRALinear(LoRALinear):
    """`LoRALinear` plus a magnitude vector: PEFT's `use_dora=True` on a linear layer."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, use_rslora: bool = False):
        super().__init__(base, r, lora_alpha, lora_dropout, dtype=dtype, use_rslora=use_rslora)
        magnitude = torch.empty(base.out_features, device=module_device(base), dtype=dtype)
        self.lora_magnitude_vector = nn.Parameter(magnitude)
        if frozen.weight_loaded(base):
            self.reset_magnitude()  # else: init_dora_magnitudes once the base weights are loaded

    def materialize(self, device: torch.device) -> None:
        super().materialize(device)
        self.lora_magnitude_vector = nn.Parameter(torch.empty_like(self.lora_magnitude_vector, device=device))

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = row norms of the base weight (PEFT's init for a fresh adapter, B = 0).

        Under FSDP2 both W and m are split by rows the same way (same dim 0, Shard(0)), so each
        rank computes its own rows' norms from its own shard: no communication. A base every rank
        holds whole (distributed/sharding.py: replicated frozen weights) gives every row's norm, of
        which the rank keeps its shard's.
        """
        # The compute dtype's dequantization, the very weight forward sees: the init is then an
        # exact no-op (scale = 1) in fp32 adapters.
        norms = dora_weight_norm(frozen.dense_weight(self.base))
        magnitude = self.lora_magnitude_vector
        if isinstance(magnitude, DTensor) and norms.shape == magnitude.shape:
            copy_full_into(magnitude, norms)
            return
        target = magnitude.to_local() if isinstance(magnitude, DTensor) else magnitude
        if target.shape != norms.shape:
            raise RuntimeError(f"DoRA magnitude shard {tuple(target.shape)} and base weight shard "
                               f"({norms.numel()} rows) do not cover the same rows")
        target.copy_(norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantize once; the base matmul, the norm and (with dropout) the second base matmul
        # all use this copy, and none keeps it for backward (NF4 backward re-dequantizes).
        weight = frozen.dense_weight(self.base, x.dtype)
        result = frozen.forward(self.base, x, weight)
        lora_a, lora_b = adapter_weight(self, self.lora_A.weight), adapter_weight(self, self.lora_B.weight)
        lora_x = self.lora_dropout(x.to(lora_a.dtype))
        norm = dora_weight_norm(weight, lora_a, lora_b, self.scaling)
        # An fp32 ratio even when bf16 mixed precision hands us m in bf16 (PEFT would round it).
        scale = adapter_weight(self, self.lora_magnitude_vector).float() / norm
        lora_result = F.linear(F.linear(lora_x, lora_a), lora_b)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base, "bias", None)
            base_result = result if bias is None else result - bias
        else:
            # PEFT: with dropout active, the direction term sees the dropped-out input too.
            base_result = frozen.matmul(self.base, lora_x, weight.to(lora_x.dtype))
        dora = (scale - 1) * base_result + scale * lora_result * self.scaling
        return (result + dora).to(result.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


def init_dora_magnitudes(model: nn.Module) -> int:
    """Set every DoRA magnitude from its (loaded, possibly sharded) base weight; returns how many."""
    layers = [module for module in model.modules() if isinstance(module, DoRALinear)]
    for layer in layers:
        layer.reset_magnitude()
    return len(layers)
