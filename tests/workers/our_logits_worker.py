"""Logits of our model (NF4 base + a trained adapter) for fixed token ids, single process.

argv: <run dir> <token ids .safetensors> <output .safetensors>. The model is built exactly as
train.py builds it from the run's config.yaml, then the exported adapter is installed.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fsdp_qlora.config import TrainConfig, load_yaml_overrides
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.sources import resolve_model
from fsdp_qlora.peft.export import install_adapter, load_peft_adapter
from fsdp_qlora.train.build import build_qlora_model


def main() -> None:
    run_dir, ids_file, out_file = map(Path, sys.argv[1:4])
    cfg = TrainConfig(**load_yaml_overrides(str(run_dir / "config.yaml")))
    env = init_distributed()
    model = build_qlora_model(resolve_model(cfg.model, cfg.model_cache_dir), cfg, env, build_mesh(env))
    install_adapter(model, load_peft_adapter(run_dir / "adapter")[1])
    model.eval()
    batch = load_file(str(ids_file))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_file({"logits": logits.float().contiguous()}, str(out_file))
    shutdown()


if __name__ == "__main__":
    main()
