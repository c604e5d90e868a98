"""Which frozen root weights are all-gathered while the decoder layers run (see test_sharding).

argv: <result json> <model dir>... Rank 0 writes, per model, for the last layer's forward and the
first layer's backward, whether the input embeddings and lm_head hold their sharded DTensor
(resharded) or a plain all-gathered tensor, plus the loss (a tied model must still train).
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.structure import decoder_layers
from fsdp_qlora.train.build import build_qlora_model


def observe(model_dir: Path, env, mesh) -> dict:
    model = build_qlora_model(model_dir, TrainConfig(model=str(model_dir), fsdp_units="layer"), env, mesh)
    seen = {}

    def record(moment):
        def hook(*_):
            seen[moment] = {"embeddings_sharded": isinstance(model.get_input_embeddings().weight, DTensor),
                            "lm_head_sharded": isinstance(model.get_output_embeddings().weight, DTensor)}
        return hook

    layers = decoder_layers(model)
    layers[-1].register_forward_pre_hook(record("forward"))
    layers[0].register_full_backward_pre_hook(record("backward"))
    ids = torch.randint(4, 500, (2, 32), generator=torch.Generator().manual_seed(env.rank))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seen["loss"] = loss.item()
    seen["adapter_grads"] = sum(int(p.grad is not None) for p in model.parameters() if p.requires_grad)
    return seen


def main() -> None:
    result, model_dirs = Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
    env = init_distributed()
    mesh = build_mesh(env)
    seen = {str(model_dir): observe(model_dir, env, mesh) for model_dir in model_dirs}
    if env.rank == 0:
        result.write_text(json.dumps(seen))
    shutdown()


if __name__ == "__main__":
    main()
