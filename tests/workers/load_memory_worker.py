"""Peak host-memory growth of loading a model (run in its own process; see test_loader_memory).

argv: <model dir> <result json>. Under torchrun each rank reports its own figures.
"""

import json
import sys
from pathlib import Path

import psutil
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (import cost is not load cost)
from torch.distributed.tensor import DTensor

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.loader import build_qlora_model
from fsdp_qlora.model.nf4 import NF4Tensor, nf4_bytes


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds after loading (its shards; NF4 with constants)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += nf4_bytes(local) if isinstance(local, NF4Tensor) else local.numel() * local.element_size()
    return total


def reset_peak_rss() -> int:
    """Restart the kernel's high-water mark at the current RSS (ru_maxrss would not do: Linux
    carries it across fork+exec, so a child would report its parent's peak)."""
    Path("/proc/self/clear_refs").write_text("5")
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024


def main() -> None:
    model_dir, result = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    mesh = build_mesh(env)
    baseline = reset_peak_rss()
    model = build_qlora_model(model_dir, TrainConfig(model=str(model_dir)), env, mesh)
    peak = peak_rss()
    figures = {"baseline": baseline, "peak_growth": peak - baseline, "held": held_bytes(model)}
    Path(f"{result}.rank{env.rank}").write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main()
