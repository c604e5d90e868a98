"""2 gloo ranks: `LocalShardAdamW` on FSDP2-style row-sharded DTensors against torch's fused AdamW
on the same DTensors: the same parameters and state, bit for bit, after a few steps (uneven row
splits included). Prints the per-step time of both (informational; speed is measured by tools/)."""

import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from fsdp_qlora.train.optim import LocalShardAdamW

SHAPES = [(8, 128), (128, 8), (8, 256), (256, 8), (7, 96), (33, 8)] * 9  # 54 tensors, like tiny-llama's 56


def params(mesh, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=gen), mesh, [Shard(0)]))
            for shape in SHAPES]


def run(cls, mesh, steps: int) -> tuple[list, dict, float]:
    ps = params(mesh, 0)
    opt = cls(ps, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), fused=True)
    gen = torch.Generator().manual_seed(1)
    seconds = []
    for _ in range(steps):
        for p in ps:
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, [Shard(0)])
        started = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - started)
    return ps, opt.state_dict(), sorted(seconds)[len(seconds) // 2]


def main() -> int:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ours, ours_state, ours_s = run(LocalShardAdamW, mesh, 20)
    ref, ref_state, ref_s = run(torch.optim.AdamW, mesh, 20)
    for a, b in zip(ours, ref):
        assert type(a) is type(b) and a.placements == b.placements
        assert torch.equal(a.to_local(), b.to_local()), "parameters differ"
    for key in ref_state["state"]:
        for name, value in ref_state["state"][key].items():
            mine = ours_state["state"][key][name]
            assert type(mine) is type(value), (name, type(mine), type(value))  # DTensor state for DCP
            local = mine.to_local() if hasattr(mine, "to_local") else mine
            assert torch.equal(local, value.to_local() if hasattr(value, "to_local") else value), name
    if dist.get_rank() == 0:
        print(f"per step: local shards {ours_s * 1e3:.2f} ms, through DTensor {ref_s * 1e3:.2f} ms", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
