"""A --synthetic-weights model as each rank holds it: its frozen tensors and its bytes by planner part.

argv: <model cache> <result prefix> <model>... (an alias, tiny-llama or a config.json). Each rank writes,
per model index i, <prefix>.<i>.rank<N>.safetensors (every frozen parameter's local shard; an NF4 one as
its inner tensors: <name>.packed, .absmax_q, .nested_absmax, .offset) and <prefix>.<i>.rank<N>.json
({"rows": {name: [start, stop]} (this rank's rows of dim 0, NF4 weights counted in logical rows),
"bytes": the planner's static parts, counted as tests/workers/planner_bytes_worker.py counts them}).
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.loader import param_rows
from fsdp_qlora.model.nf4 import PackedNF4
from fsdp_qlora.model.sources import resolve_model
from fsdp_qlora.train.build import build_qlora_model
from tests.workers.planner_bytes_worker import bytes_by_part

INNER = ("packed", "absmax_q", "nested_absmax", "offset")


def local_tensors(model) -> tuple[dict, dict]:
    """(name -> this rank's tensor, name -> its [start, stop) rows of dim 0) of every frozen parameter."""
    tensors, rows = {}, {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if isinstance(param, DTensor) else param
        rows[name] = list(param_rows(param, param.shape[0]))
        if isinstance(local, PackedNF4):
            tensors.update({f"{name}.{inner}": t.contiguous() for inner, t in zip(INNER, local.inner_tensors())})
        else:
            tensors[name] = local.contiguous()
    return tensors, rows


def main() -> None:
    cache, prefix, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    env = init_distributed()
    mesh = build_mesh(env)
    for index, name in enumerate(models):
        # per-layer units: each rank holds (and draws) its rows; the model unit would hold the base whole
        cfg = TrainConfig(model=name, synthetic_weights=True, model_cache_dir=cache, fsdp_units="layer")
        model = build_qlora_model(resolve_model(name, cache, synthetic=True), cfg, env, mesh)
        tensors, rows = local_tensors(model)
        save_file(tensors, f"{prefix}.{index}.rank{env.rank}.safetensors")
        Path(f"{prefix}.{index}.rank{env.rank}.json").write_text(
            json.dumps({"rows": rows, "bytes": bytes_by_part(model, cfg)}))
    shutdown()


if __name__ == "__main__":
    main()
