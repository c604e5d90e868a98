"""The compute dtype (`--compute-dtype`) and fp16's dynamic loss scaling.

What is stored does not change with the compute dtype: NF4 bytes (bitsandbytes' own, quantized from
the checkpoint's bf16), the other frozen weights in bf16, the adapters, their gradients and the
optimizer state in fp32. The compute dtype is what FSDP2's mixed precision casts the gathered
parameters to (`MixedPrecisionPolicy.param_dtype`), hence the activations' dtype, and what NF4
weights dequantize into (they follow the activations). Gradients are reduced in fp32.

``auto``: bf16 where the device computes it natively (CUDA GPUs since Ampere; CPUs with AVX512-BF16
or AMX, as oneDNN reports); fp16 on GPUs without bf16 (T4, V100), with dynamic loss scaling; fp32 on
CPUs without native bf16, where a bf16 matmul is emulated (~60x slower than fp32, measured on such
a CPU: 0.95 against 75 GFLOP/s).
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware (asked of the runtime, not guessed)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators (XPU, MPS) run bf16 natively where torch supports them at all


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--compute-dtype` for this device: ``auto`` picks per the module docstring."""
    if name != "auto":
        return DTYPES[name]
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


class LossScaler:
    """Dynamic loss scaling for fp16 compute, on FSDP2's sharded fp32 gradients.

    The loss is multiplied by `scale` before backward so that small fp16 gradients do not flush to
    zero; the (fp32, reduced) gradients are divided by it before clipping. A step whose gradient
    norm is not finite overflowed: the loop skips it, as its non-finite guard does, and the scale
    halves; after `growth_interval` good steps in a row it doubles (torch.amp.GradScaler's policy,
    which does not handle DTensor gradients; here the norm the loop computes anyway is the check,
    so no extra all-reduce). Disabled (scale 1, nothing done) for bf16 and fp32.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> bool:
        """Record a step's outcome; True when an overflow was absorbed by lowering the scale (the
        loop then skips the step without counting it as a bad one)."""
        if not self.enabled:
            return False
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0
            return False
        self.good_steps = 0
        if self.scale / 2 < self.min_scale:
            return False  # nothing left to lower: a real divergence, for the non-finite guard
        self.scale /= 2
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
