"""torchrun worker for tests/test_nf4.py: FSDP2-sharded NF4 weights loaded from safetensors.

argv: <safetensors file> <result dir>. Checks, on every rank:
  * loader shards hold bitsandbytes' quantize_4bit bytes of the whole weight at their rows, and
    dequantize exactly as its dequantize_4bit does (fsdp_qlora/model/nf4.py);
  * the all-gathered weight is bitsandbytes' quantization of the whole weight, byte for byte;
  * the sharded forward and backward equal an unsharded bitsandbytes reference bit for bit;
  * an all-gather of crafted bytes (every byte value, bf16-NaN patterns, NaN float32
    constants) returns exactly the bytes each rank contributed.
"""

import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.model.loader import load_base_weights, local_row_range
from fsdp_qlora.model.nf4 import NF4Tensor
from fsdp_qlora.model.quantized_linear import NF4Linear


class Chain(nn.Module):
    """Linears applied in sequence, named like checkpoint keys (`layers.i.weight`)."""

    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(NF4Linear(cols, rows, device="meta") for rows, cols in shapes)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def bnb_quantized(full: torch.Tensor):
    """bitsandbytes' own quantization of the whole weight: (packed, state, dequantized)."""
    packed, state = bnbf.quantize_4bit(full.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, state, bnbf.dequantize_4bit(packed, state)


def check_loaded_weights(file: Path, env, mesh) -> None:
    weights = load_file(str(file))
    shapes = [tuple(weights[f"layers.{i}.weight"].shape) for i in range(len(weights))]
    model = Chain(shapes)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    load_base_weights(model, file.parent, env.device)
    x = torch.randn(5, shapes[0][1], generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    expected_x = x.clone()
    references = []
    for i, layer in enumerate(model.layers):
        full = weights[f"layers.{i}.weight"]
        packed, state, ref = bnb_quantized(full)
        references.append(ref)
        start, stop = local_row_range(full.shape[0], mesh)
        shard = layer.weight.to_local()
        assert isinstance(shard, NF4Tensor) and shard.first_block == start * full.shape[1] // 64
        assert torch.equal(shard.packed, packed.view(full.shape[0], -1)[start:stop])
        blocks = slice(start * full.shape[1] // 64, stop * full.shape[1] // 64)
        assert torch.equal(shard.absmax_q, state.absmax[blocks]), f"shard {i}: 8-bit absmax differs"
        assert torch.equal(shard.nested_absmax, state.state2.absmax) and torch.equal(shard.offset, state.offset.reshape(1))
        assert torch.equal(shard.dequantize(), ref[start:stop]), f"shard {i} differs from bitsandbytes"
        expected_x = expected_x @ ref.t()
    x.requires_grad_(True)
    out = model(x)
    assert torch.equal(out, expected_x), "sharded forward differs from the unsharded reference"
    out.float().square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    y = ref_x
    for ref in references:
        y = y @ ref.t()
    y.float().square().sum().backward()
    assert torch.equal(x.grad, ref_x.grad), "sharded backward differs from the unsharded reference"
    for i, layer in enumerate(model.layers):
        layer.unshard()
        gathered = layer.weight
        packed, state, _ = bnb_quantized(weights[f"layers.{i}.weight"])
        assert isinstance(gathered, NF4Tensor) and gathered.first_block == 0
        assert torch.equal(gathered.packed.reshape(-1), packed.reshape(-1))
        assert torch.equal(gathered.absmax_q, state.absmax), "the gathered weight is not one quantization unit"
        assert torch.equal(gathered.dequantize(), references[i])
        layer.reshard()


def crafted_shard(rank: int) -> NF4Tensor:
    """Packed bytes holding every value 0..255 (so every bf16 NaN/inf bit pattern as pairs),
    and float32 constants that are NaN payloads, -0.0 and inf."""
    packed = torch.arange(256, dtype=torch.int32).roll(rank * 17).to(torch.uint8).repeat(8).view(32, 64)
    absmax_q = torch.arange(64, dtype=torch.int32).add(200 + rank).remainder(256).to(torch.uint8)
    nested_bits = torch.tensor([0x7FC00001 + rank, -1, -2147483648, 0x7F800000], dtype=torch.int32)
    return NF4Tensor(packed, absmax_q, nested_bits.view(torch.float32)[:1].clone(),
                     nested_bits.view(torch.float32)[1 + rank:2 + rank].clone(), torch.bfloat16)


def check_crafted_all_gather(env, mesh) -> None:
    holder = NF4Linear(128, 32 * env.world_size, device="meta")
    fully_shard(holder, mesh=mesh)
    local = crafted_shard(env.rank)
    holder.weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                    shape=holder.weight.shape, stride=holder.weight.stride()),
                                 requires_grad=False)
    holder.unshard()
    gathered = holder.weight
    expected = [crafted_shard(r) for r in range(env.world_size)]
    for name in ("packed", "absmax_q"):  # sharded: each rank's bytes, concatenated
        want = torch.cat([getattr(t, name).reshape(-1) for t in expected]).view(torch.uint8)
        got = getattr(gathered, name).reshape(-1).view(torch.uint8)
        assert torch.equal(got, want), f"all-gather changed bytes of {name}"
    for name in ("nested_absmax", "offset"):  # the whole weight's, held by every shard: kept bit for bit
        got = getattr(gathered, name).reshape(-1).view(torch.uint8)
        assert torch.equal(got, getattr(local, name).reshape(-1).view(torch.uint8)), f"{name} bits changed"
    holder.reshard()


def main() -> None:
    file, result_dir = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    mesh = build_mesh(env)
    check_loaded_weights(file, env, mesh)
    check_crafted_all_gather(env, mesh)
    dist.barrier()
    (result_dir / f"ok-rank{env.rank}").write_text("ok")
    shutdown()


if __name__ == "__main__":
    main()
