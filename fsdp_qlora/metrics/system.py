"""Memory and model-FLOPs utilization figures for the logs."""

from __future__ import annotations

import time

import psutil
import torch
from torch import nn

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' spec sheets.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "A6000": 155.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0,
}


def memory_scalars(device: torch.device) -> dict[str, float]:
    """GPU allocated/reserved/peak in GiB; on CPU the host RSS of this process."""
    gib = 2.0**30
    if device.type == "cuda":
        return {"allocated_gib": torch.cuda.memory_allocated(device) / gib,
                "reserved_gib": torch.cuda.memory_reserved(device) / gib,
                "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib}
    return {"host_rss_gib": psutil.Process().memory_info().rss / gib}


def flops_per_token(model: nn.Module, context_length: int) -> float:
    """Training FLOPs per token: 2N forward, plus 2N backward for activation gradients through
    every weight, plus 2N more only where weights train (the adapters); attention scores add
    12 * layers * hidden * context (forward and backward). Frozen NF4 weights get no weight
    gradient, hence 4N, not the usual 6N, for them."""
    frozen = trainable = 0
    for param in model.parameters():
        count = param.numel() * (2 if param.dtype == torch.uint8 else 1)  # two NF4 weights per byte
        if param.requires_grad:
            trainable += count
        else:
            frozen += count
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * context_length
    return 4 * frozen + 6 * trainable + attention


def peak_tflops(device: torch.device) -> float:
    """The device's peak: the spec sheet for known GPUs; otherwise (CPU, unknown GPU) an
    empirical peak, the throughput of a large bf16 matmul measured here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
    return _measured_matmul_tflops(device)


def _measured_matmul_tflops(device: torch.device, size: int = 1024, repeats: int = 3) -> float:
    a = torch.full((size, size), 0.5, device=device, dtype=torch.bfloat16)  # no RNG draw: dropout owns it
    a @ a  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
