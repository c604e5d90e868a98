"""Memory and model-FLOPs utilization figures for the logs."""

from __future__ import annotations

import time
from pathlib import Path

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


def reset_peak_rss() -> int:
    """Restart the kernel's high-water mark of this process at its current RSS, and return that.

    ru_maxrss would not do: Linux carries it across fork+exec, so a child would report its
    parent's peak. Linux only (/proc/self/clear_refs, VmHWM).
    """
    Path("/proc/self/clear_refs").write_text("5")
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process' RSS high-water mark (since start or `reset_peak_rss`), in bytes."""
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024


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


def peak_tflops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """The device's peak in the compute dtype: the spec sheet (bf16/fp16 tensor cores) for known GPUs;
    otherwise (CPU, unknown GPU, fp32) an empirical peak, the best matmul throughput measured here."""
    if dtype is not None and (device.type != "cuda" or dtype == torch.float32):
        return _measured_matmul_tflops(device, dtype, size=4096 if device.type == "cuda" else 512)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
        return _measured_matmul_tflops(device, torch.bfloat16, size=4096)
    # CPUs differ in which dtype is fast: without AMX/AVX512-BF16, bf16 matmuls are emulated and
    # can be ~60x slower than fp32 (measured on the 2-core AMD EPYC CI machine), so the peak is
    # the faster of the two.
    return max(_measured_matmul_tflops(device, dtype, size=512) for dtype in (torch.float32, torch.bfloat16))


def _measured_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """The best of `repeats` timed matmuls: on a shared host (other ranks, other jobs) the fastest
    one is the closest to what the device can do."""
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # no RNG draw: dropout owns it
    a @ a  # warm-up
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * size**3 / fastest / 1e12
