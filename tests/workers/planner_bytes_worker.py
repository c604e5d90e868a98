"""Bytes a real sharded QLoRA model holds per rank, by part (checked against the planner).

argv: <model dir> <result json> <case>... with case = "optimizer,lora rank,min_8bit_size,train type[,fsdp units]"
(units: layer unless given; the model unit holds the frozen base whole, distributed/sharding.py).
Each rank writes <result>.rank<N>: {case: bytes by part}.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.nf4 import PackedNF4
from fsdp_qlora.train.build import build_qlora_model
from fsdp_qlora.train.optim import build_optimizer


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def held_bytes(model_dir: str, case: str, env, mesh) -> dict[str, int]:
    optimizer, rank, min_8bit, train_type, *units = case.split(",")
    cfg = TrainConfig(model=model_dir, lora_rank=int(rank), optimizer=optimizer, min_8bit_size=int(min_8bit),
                      train_type=train_type, fsdp_units=units[0] if units else "layer")
    return bytes_by_part(build_qlora_model(Path(model_dir), cfg, env, mesh), cfg)


def bytes_by_part(model, cfg: TrainConfig) -> dict[str, int]:
    """This rank's bytes in the planner's static parts, counted on the model (and an optimizer step)."""
    figures = dict.fromkeys(("nf4_weights", "quant_constants", "frozen_bf16", "adapter_params", "adapter_grads",
                             "optimizer_state"), 0)
    for param in model.parameters():
        local = _local(param)
        if isinstance(local, PackedNF4):  # NF4Tensor, NF4Experts
            figures["nf4_weights"] += local.packed.numel()
            figures["quant_constants"] += sum(t.numel() * t.element_size() for t in local.inner_tensors()[1:])
        elif param.requires_grad:
            figures["adapter_params"] += local.numel() * local.element_size()
        else:
            figures["frozen_bf16"] += local.numel() * local.element_size()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg)
    for p in params:
        p.grad = torch.zeros_like(p)
    figures["adapter_grads"] = sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in params)
    opt.step()
    seen = set()
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and not key.startswith("qmap"):
                value = _local(value)
                if value.data_ptr() not in seen or value.numel() <= 1:
                    seen.add(value.data_ptr())
                    figures["optimizer_state"] += value.numel() * value.element_size()
    return figures


def main() -> None:
    model_dir, result, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    env = init_distributed()
    mesh = build_mesh(env)
    figures = {case: held_bytes(model_dir, case, env, mesh) for case in cases}
    Path(f"{result}.rank{env.rank}").write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main()
