"""The NF4 base and logits of each model under one layout (tests/test_architectures.py).

argv: <output dir> <sharding> <runs dir or -> <model dir>... Every rank builds each model exactly as
train.py does (adapters at their zero init, so the logits are the base's; or, given a runs dir, with
<runs dir>/<model dir name>/adapter installed), runs the same fixed token ids, and rank 0 writes
<output dir>/<model dir name>.safetensors (the logits) and .json (the sha256 of every decoder
linear's and expert's NF4 bytes and dequantized weight, as the all-gathered whole tensor: tests/oracles.py).
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.experts import expert_params
from fsdp_qlora.model.nf4 import NF4Tensor
from fsdp_qlora.model.nf4_experts import NF4Experts
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.model.structure import decoder_layers
from fsdp_qlora.peft.export import install_adapter, load_peft_adapter
from fsdp_qlora.train.build import build_qlora_model
from tests.oracles import QUANT_PARTS, tensor_digest

IDS = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def base_digests(model) -> dict[str, str]:
    tensors = {}
    for index, layer in enumerate(decoder_layers(model)):
        if isinstance(layer, FSDPModule):  # not under --sharding ddp, which leaves the model out of FSDP2
            layer.unshard()  # FSDP2 all-gathers the layer: the NF4 weights are whole tensors now
        for name, module in layer.named_modules():
            if isinstance(module, NF4Linear):
                weight = module.weight
                assert isinstance(weight, NF4Tensor) and weight.first_block == 0
                key = f"layers.{index}.{name.removesuffix('.base')}"
                for part, tensor in zip(QUANT_PARTS, weight.inner_tensors()):
                    tensors[f"{key}.{part}"] = tensor_digest(tensor)
                tensors[f"{key}.dequantized"] = tensor_digest(weight.dequantize())
            for param in expert_params(module):
                experts = getattr(module, param)
                assert isinstance(experts, NF4Experts)
                for expert in range(experts.num_experts):
                    key = f"layers.{index}.{name.removesuffix('.base')}.{param}.{expert}"
                    quantized = experts.expert(expert)
                    for part, tensor in zip(QUANT_PARTS, quantized.inner_tensors()):
                        tensors[f"{key}.{part}"] = tensor_digest(tensor)
                    tensors[f"{key}.dequantized"] = tensor_digest(quantized.dequantize())
        if isinstance(layer, FSDPModule):
            layer.reshard()
    return tensors


def main() -> None:
    out_dir, sharding, runs, model_dirs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    env = init_distributed()
    mesh = build_mesh(env, sharding)
    for model_dir in map(Path, model_dirs):
        # per-layer units: base_digests unshards one layer at a time; compute dtype: the run's default
        # (auto) unless the test asks for another (ARCH_COMPUTE_DTYPE)
        cfg = TrainConfig(model=str(model_dir), lora_dropout=0.0, sharding=sharding, fsdp_units="layer",
                          compute_dtype=os.environ.get("ARCH_COMPUTE_DTYPE", "auto"))
        model = build_qlora_model(model_dir, cfg, env, mesh).eval()
        if runs != "-":
            install_adapter(model, load_peft_adapter(Path(runs) / model_dir.name / "adapter")[1])
        with torch.no_grad():
            logits = model(input_ids=IDS).logits.float()
        digests = base_digests(model)
        if env.is_main:
            save_file({"logits": logits.contiguous()}, str(out_dir / f"{model_dir.name}.safetensors"))
            (out_dir / f"{model_dir.name}.json").write_text(json.dumps(digests, indent=0))
    shutdown()


if __name__ == "__main__":
    main()
