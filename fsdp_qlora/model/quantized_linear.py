"""A frozen linear layer whose weight is an `NF4Tensor`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp_qlora.model.nf4 import NF4Tensor


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W)^T (+ b). Weight and bias are frozen, so backward only needs dL/dx.

    The bias goes into the same `F.linear` call, as bitsandbytes' `gemm_4bit` does it: a fused
    add rounds differently from a matmul followed by an add in bf16.

    By default the weight is dequantized again in backward instead of being saved: saving it
    would keep a full-precision copy of every layer alive until backward, which is
    exactly the memory NF4 is meant to save. (bitsandbytes' MatMul4Bit does the same.)
    With `keep` (``--dequantize-once``) the dequantized weight is saved instead, trading that
    memory for one dequantization per weight and step (docs/memory.md).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, dense: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, keep: bool = False) -> torch.Tensor:
        # `dense`: the weight already dequantized by the caller (DoRA needs it for its norm too),
        # so one forward dequantizes once.
        dense = weight.dequantize(x.dtype) if dense is None else dense
        ctx.weight = weight
        # Saved as a tensor for backward, not held as an attribute: activation checkpointing then
        # drops it with the layer's other activations (recomputing it with them) and activation
        # offloading moves it, so a checkpointed layer keeps no dequantized weight until backward.
        ctx.save_for_backward(dense if keep else None)
        return F.linear(x, dense, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (kept,) = ctx.saved_tensors
        dense = kept if kept is not None else ctx.weight.dequantize(grad_output.dtype)
        return grad_output @ dense, None, None, None, None


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, dense: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, keep: bool = False) -> torch.Tensor:
    """x @ dequant(weight)^T + bias; `dense` is the dequantized weight if the caller has it; `keep`
    saves it for backward instead of dequantizing again there."""
    if not isinstance(weight, NF4Tensor):
        raise RuntimeError("NF4Linear used before its weight was loaded")
    return _NF4Matmul.apply(x, weight, dense, bias, keep)


class NF4Linear(nn.Module):
    """Drop-in for `nn.Linear` with a frozen NF4 weight (and a frozen bias in the compute dtype).

    ``weight`` is a uint8 parameter of shape ``(out_features, in_features // 2)``: a plain
    placeholder while the model is on the meta device, an `NF4Tensor` (or a DTensor of one,
    under FSDP2) once loaded.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        placeholder = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(placeholder, requires_grad=False)
        bias_param = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.bias = nn.Parameter(bias_param, requires_grad=False) if bias else None
        self.dequantize_once = False  # --dequantize-once: keep the dequantized weight for backward

    def forward(self, x: torch.Tensor, dense_weight: torch.Tensor | None = None) -> torch.Tensor:
        """`dense_weight`: this layer's weight already dequantized in x's dtype, to reuse."""
        return nf4_matmul(x, self.weight, dense_weight, self.bias, self.dequantize_once)

    # ---- the frozen-base interface (model/frozen.py) ----------------------------------------
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight dequantized to `dtype` (default: the compute dtype): the whole weight while
        FSDP2 has it gathered, this rank's rows otherwise (e.g. to initialize DoRA's magnitude)."""
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        if not isinstance(weight, NF4Tensor):
            raise RuntimeError("the NF4 base weight is not loaded yet: load the base weights first")
        return weight.dequantize(dtype)

    def matmul(self, x: torch.Tensor, dense_weight: torch.Tensor) -> torch.Tensor:
        """x @ W^T without the bias; backward dequantizes W again instead of keeping `dense_weight`
        (unless `dequantize_once`)."""
        return nf4_matmul(x, self.weight, dense_weight, keep=self.dequantize_once)

    def weight_loaded(self) -> bool:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return isinstance(weight, NF4Tensor)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"
