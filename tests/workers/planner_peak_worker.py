"""Peak memory of real training steps, by FSDP2's memory tracker, next to the planner's prediction.

argv: <model dir> <result json> <case>... with case = "batch,context,checkpointing(0/1),train_type,dropout".
Each case builds the model afresh and runs two steps (forward with the chunked loss, backward,
optimizer step; the first creates the optimizer state) under
`torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`, which counts every tensor storage
the step allocates (parameters, all-gathered buffers, activations, temporaries, gradients,
optimizer state) on any device, CPU included. Rank 0 writes {case: {"tracked": bytes, "planned": bytes}}.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.tensor import DTensor

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.nf4 import PackedNF4, nf4_bytes
from fsdp_qlora.train.build import build_qlora_model
from fsdp_qlora.train.loss import token_loss_sum
from fsdp_qlora.train.optim import build_optimizer
from fsdp_qlora.train.planner import Options, plan_memory


def tracked_peak(model_dir: Path, cfg: TrainConfig, env, mesh, batch: int, context: int) -> int:
    model = build_qlora_model(model_dir, cfg, env, mesh)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    ids = torch.randint(4, 1000, (batch, context), generator=torch.Generator().manual_seed(env.rank))
    inputs = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs((inputs,))
    for step in range(2):
        with tracker:
            token_loss_sum(model, inputs, cfg.loss_chunk_tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 0:
            tracker.reset_mod_stats()  # the peak of the second step: optimizer state exists
    # The tracker counts FSDP2's parameters; frozen weights held whole outside FSDP2 (one rank, ddp,
    # the model unit: distributed/sharding.py) are resident all along, so they are added here.
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values()) + _unmanaged_bytes(model)


def _unmanaged_bytes(model) -> int:
    total = 0
    for param in model.parameters():
        if not isinstance(param, DTensor):
            total += nf4_bytes(param) if isinstance(param, PackedNF4) else param.numel() * param.element_size()
    return total


def main() -> None:
    model_dir, result, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    env = init_distributed()
    mesh = build_mesh(env)
    config = json.loads((model_dir / "config.json").read_text())
    figures = {}
    for case in cases:
        batch, context, checkpointing, train_type, dropout = case.split(",")
        cfg = TrainConfig(model=str(model_dir), train_type=train_type, lora_dropout=float(dropout),
                          activation_checkpointing=checkpointing == "1", batch_size=int(batch),
                          context_length=int(context))
        tracked = tracked_peak(model_dir, cfg, env, mesh, int(batch), int(context))
        planned = plan_memory(config, Options(cfg, env.world_size)).peak
        figures[case] = {"tracked": tracked, "planned": planned}
    if env.rank == 0:
        result.write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main()
