"""NF4 storage: bitsandbytes is the oracle; FSDP2 sharding must not change a single byte."""

import pytest
import torch
import bitsandbytes.functional as bnbf
from safetensors.torch import save_file

from fsdp_qlora.model.nf4 import NF4Tensor, nf4_bytes, quantize_nf4
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
    assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(packed, state))
    assert ours.shape == (shape[0], shape[1] // 2) and ours.dtype == torch.uint8


def test_multi_slice_dequantize_equals_per_slice_bitsandbytes():
    """A gathered tensor of N slices dequantizes as bitsandbytes does each slice, including
    when nested blocks of 256 absmax values do not align with slice boundaries."""
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    slices = [quantize_nf4(part) for part in weight.chunk(3)]
    gathered = NF4Tensor(*(torch.cat([getattr(s, n) for s in slices]) for n in
                           ("packed", "absmax_q", "nested_absmax", "offset")), torch.bfloat16)
    expected = torch.cat([bnbf.dequantize_4bit(*bnbf.quantize_4bit(part.contiguous(), blocksize=64,
                          compress_statistics=True, quant_type="nf4")) for part in weight.chunk(3)])
    assert gathered.num_slices == 3
    assert torch.equal(gathered.dequantize(), expected)


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
