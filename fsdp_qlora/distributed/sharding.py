"""FSDP2 sharding: a DeviceMesh over the world, each decoder layer then the root."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fsdp_qlora.distributed.env import DistEnv


def build_mesh(env: DistEnv) -> DeviceMesh:
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp_shard",))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList with one entry per hidden layer."""
    num_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`fully_shard` every decoder layer, then the root (embeddings, final norm, lm_head).

    Compute runs in `param_dtype` (the fp32 adapters are cast for the matmuls); gradients
    are reduced in fp32 so that averaging across ranks loses nothing.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
