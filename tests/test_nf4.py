"""NF4 storage: bitsandbytes is the oracle; FSDP2 sharding must not change a single byte."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import save_file

from fsdp_qlora.model.nf4 import nf4_bytes, nf4_row_shard, quantize_nf4, quantize_nf4_rows
from fsdp_qlora.model.quantized_linear import NF4Linear
from tests.conftest import REPO, run_torchrun

SHAPES = [(64, 128), (256, 64), (128, 320), (192, 1024)]


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ours = quantize_nf4(weight)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax_q, state.absmax)
    assert torch.equal(ours.nested_absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset.reshape(1))
    assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(packed, state))
    assert ours.shape == (shape[0], shape[1] // 2) and ours.dtype == torch.uint8


@pytest.mark.parametrize("shape,world", [((96, 128), 3), ((1536, 576), 2), ((576, 576), 4), ((192, 1024), 3)])
def test_row_shards_hold_bitsandbytes_whole_weight_bytes(shape, world):
    """Each rank quantizes only its rows, exchanging the first-level absmax: its shard holds exactly
    bitsandbytes' bytes of the whole weight at those rows, and dequantizes to the same values, also
    when a nested group of 256 blocks straddles two shards (every shape here but (576, 576) x 4)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    whole = bnbf.dequantize_4bit(packed, state)
    rows = shape[0] // world
    local_absmax = [bnbf.quantize_4bit(part.contiguous(), blocksize=64, quant_type="nf4")[1].absmax
                    for part in weight.split(rows)]
    gathered = torch.cat(local_absmax)  # what the all-gather over the ranks returns
    blocks = rows * shape[1] // 64
    for rank, part in enumerate(weight.split(rows)):
        shard = quantize_nf4_rows(part, gather_absmax=lambda _: gathered, first_block=rank * blocks)
        assert torch.equal(shard.packed.reshape(-1), packed.reshape(-1)[rank * rows * shape[1] // 2:][:part.numel() // 2])
        assert torch.equal(shard.absmax_q, state.absmax[rank * blocks:(rank + 1) * blocks])
        assert torch.equal(shard.nested_absmax, state.state2.absmax)
        assert torch.equal(shard.offset, state.offset.reshape(1))
        assert torch.equal(shard.dequantize(), whole[rank * rows:(rank + 1) * rows])
        assert torch.equal(nf4_row_shard(quantize_nf4(weight), rank * rows, (rank + 1) * rows).dequantize(),
                           shard.dequantize())


def test_nf4_linear_forward_and_input_grad():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    layer = NF4Linear(128, 64)
    layer.weight = torch.nn.Parameter(quantize_nf4(weight), requires_grad=False)
    dense = layer.weight.dequantize()
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).float().sum().backward()
    (x_ref @ dense.t()).float().sum().backward()
    assert torch.equal(layer(x), x_ref @ dense.t())
    assert torch.equal(x.grad, x_ref.grad)


def test_nf4_bytes_is_about_4_13_bits_per_weight():
    weight = torch.randn(1024, 1024).to(torch.bfloat16)
    bits = nf4_bytes(quantize_nf4(weight)) * 8 / weight.numel()
    assert 4.12 < bits < 4.14


def test_unsupported_ops_fail_loudly():
    t = quantize_nf4(torch.randn(64, 64).to(torch.bfloat16))
    with pytest.raises(NotImplementedError, match="dequantize"):
        t + 1
    with pytest.raises(NotImplementedError):
        t.to(torch.bfloat16)


@pytest.mark.parametrize("world_size", [1, 2])
def test_fsdp2_loader_allgather_and_forward_are_exact(tmp_path, world_size):
    gen = torch.Generator().manual_seed(3)
    # In/out sizes chain: 128 -> 256 -> 64 -> 320 -> 128.
    shapes = [(256, 128), (64, 256), (320, 64), (128, 320)]
    tensors = {f"layers.{i}.weight": (torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16)
               for i, s in enumerate(shapes)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    run_torchrun(REPO / "tests/workers/nf4_fsdp_worker.py", world_size,
                 str(tmp_path / "model.safetensors"), str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("ok-rank*")) == [f"ok-rank{r}" for r in range(world_size)]
