"""The gradient norm taken from FSDP2's reduction (distributed/grad_norm.py `ReducedSquares`) against
the norm of the all-gathered gradients, on a real tiny Llama, per FSDP unit layout (see test_sharding).

argv: <result json> <model dir>. Rank 0 writes, per --fsdp-units, the norm from the reduction's
squares, the collective path's norm (`clip_grad_norm` without squares), the norm of the full
gradients, whether the ddp layout (nothing to reduce-scatter) installs no `ReducedSquares`, and what
the ddp layout's model is made of (FSDP2 modules, DTensor adapters, dtypes, its gradient reducer).
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.grad_norm import clip_grad_norm
from fsdp_qlora.distributed.sharding import build_mesh, reduced_squares_of
from fsdp_qlora.peft.apply import ADAPTER_LAYERS
from fsdp_qlora.train.build import build_qlora_model


def norms(model_dir: Path, env, mesh, units: str) -> dict:
    model = build_qlora_model(model_dir, TrainConfig(model=str(model_dir), fsdp_units=units), env, mesh)
    ids = torch.randint(4, 500, (2, 32), generator=torch.Generator().manual_seed(env.rank))
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    full = torch.cat([p.grad.full_tensor().flatten().double() for p in params])
    squares = reduced_squares_of(model).take()
    return {"from_reduction": clip_grad_norm(params, 0.0, squares),
            "collective": clip_grad_norm(params, 0.0),
            "full": torch.linalg.vector_norm(full).item(),
            "taken_twice": reduced_squares_of(model).take() is not None}


def main() -> None:
    result, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    seen = {units: norms(model_dir, env, build_mesh(env, "fsdp"), units) for units in ("layer", "model")}
    ddp = build_qlora_model(model_dir, TrainConfig(model=str(model_dir)), env, build_mesh(env, "ddp"))
    seen["ddp_has_reduced_squares"] = reduced_squares_of(ddp) is not None
    adapters = [p for p in ddp.parameters() if p.requires_grad]
    seen["ddp_layout"] = {
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in ddp.modules()),
        "dtensor_adapters": sum(isinstance(p, DTensor) for p in adapters),
        "adapter_dtypes": sorted({str(p.dtype) for p in adapters}),
        "compute_dtypes": sorted({str(m.compute_dtype) for m in ddp.modules() if isinstance(m, ADAPTER_LAYERS)}),
        "gradient_all_reduce": getattr(ddp, "gradient_all_reduce", None) is not None}
    if env.rank == 0:
        result.write_text(json.dumps(seen))
    shutdown()


if __name__ == "__main__":
    main()
