"""DoRA and rsLoRA against PEFT (the oracle), on dense and NF4-dequantized bases.

Our DoRA computes the weight norm by low-rank algebra (`dora_weight_norm`) where PEFT forms
W + s·B·A, so the two norms differ by fp32 rounding (~1e-7 relative) and the outputs are compared
with tolerances instead of bit equality:
  * fp32 models: rtol = atol = 1e-5 on logits and every gradient, about 100x the observed gap
    and far below any real bug (a wrong sign, a missing detach or scaling changes them by >= 1e-2);
  * bf16 models: a 1e-7 change in a scale can flip one bf16 rounding (2^-8 relative), which then
    travels through the layers; compared with bf16 rtol (1.6e-2) and an atol of 2^-8 times the
    output scale.
rsLoRA on plain LoRA uses PEFT's ops in PEFT's order, so it stays bitwise equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fsdp_qlora.config import DEFAULT_TARGET_MODULES
from fsdp_qlora.peft import dora
from fsdp_qlora.peft.apply import apply_lora
from fsdp_qlora.peft.dora import DoRALinear, dora_weight_norm, init_dora_magnitudes
from fsdp_qlora.peft.lora import LoRALinear, lora_scaling
from fsdp_qlora.peft.spec import AdapterSpec
from fsdp_qlora.peft.targets import peft_target_modules
from tests.conftest import run_python
from tests.test_lora import (
    EXACT,
    adapted_nf4_and_dense,
    forward_backward,
    lora_grads,
    nf4_round_trip_linears,
    tiny_llama,
)


def tolerances(dtype: torch.dtype, reference: torch.Tensor) -> dict:
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 1.6e-2, "atol": reference.abs().max().item() * 2 ** -8}


def peft_and_ours(base: nn.Module, r: int, alpha: float, targets: list[str] | str, use_dora: bool,
                  use_rslora: bool, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """The same base wrapped by PEFT and by us, sharing random adapter weights (B nonzero, m moved
    away from its init) so that every term of the DoRA formula matters."""
    ours = copy.deepcopy(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=peft_target_modules(targets), lora_dropout=dropout, use_dora=use_dora,
                        use_rslora=use_rslora)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    apply_lora(ours, AdapterSpec(targets, r, alpha, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora))
    generator = torch.Generator().manual_seed(123)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    pairs = 0
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if not isinstance(layer, LoRALinear):
                continue
            peft_layer = peft_layers[name]
            assert layer.scaling == peft_layer.scaling["default"] == lora_scaling(alpha, r, use_rslora)
            for ours_weight, peft_weight in ((layer.lora_A.weight, peft_layer.lora_A["default"].weight),
                                             (layer.lora_B.weight, peft_layer.lora_B["default"].weight)):
                peft_weight.copy_(torch.randn(peft_weight.shape, generator=generator) * 0.1)
                ours_weight.copy_(peft_weight)
            if use_dora:
                peft_magnitude = peft_layer.lora_magnitude_vector["default"].weight
                peft_magnitude.mul_(1 + 0.2 * torch.rand(peft_magnitude.shape, generator=generator))
                layer.lora_magnitude_vector.copy_(peft_magnitude)
            pairs += 1
    assert pairs > 0
    return peft_model, ours


@pytest.mark.parametrize("dtype, nf4, r, alpha, hidden, intermediate, targets, use_dora, use_rslora", [
    (torch.float32, False, 4, 8, 64, 128, DEFAULT_TARGET_MODULES, True, False),
    (torch.float32, False, 16, 7, 128, 192, ["q_proj", "v_proj", "down_proj"], True, True),
    (torch.float32, True, 2, 4, 128, 128, ["k_proj", "o_proj", "gate_proj"], True, False),
    (torch.bfloat16, False, 8, 16, 64, 128, DEFAULT_TARGET_MODULES, True, False),
    (torch.bfloat16, True, 8, 32, 64, 192, r".*\.(q_proj|up_proj)", True, True),
    (torch.float32, True, 8, 16, 64, 128, DEFAULT_TARGET_MODULES, False, True),
    (torch.bfloat16, False, 4, 16, 64, 192, ["v_proj", "down_proj"], False, True),
])
def test_llama_forward_and_grads_match_peft(dtype, nf4, r, alpha, hidden, intermediate, targets, use_dora,
                                            use_rslora):
    base = tiny_llama(hidden, intermediate, dtype=dtype)
    if nf4:
        nf4_round_trip_linears(base)
    peft_model, ours = peft_and_ours(base, r, alpha, targets, use_dora, use_rslora)
    generator = torch.Generator().manual_seed(7)
    embeds = torch.randn(2, 9, hidden, generator=generator).to(dtype)
    probe = torch.randn(2, 9, 128, generator=generator)

    peft_logits, peft_input_grad = forward_backward(peft_model, embeds, probe)
    ours_logits, ours_input_grad = forward_backward(ours, embeds, probe)

    tol = tolerances(dtype, peft_logits) if use_dora else EXACT
    torch.testing.assert_close(ours_logits, peft_logits, **tol)
    torch.testing.assert_close(ours_input_grad, peft_input_grad,
                               **(tolerances(dtype, peft_input_grad) if use_dora else EXACT))
    peft_grads, ours_grads = lora_grads(peft_model, "base_model.model."), lora_grads(ours)
    assert sorted(ours_grads) == sorted(peft_grads)
    assert sum(".lora_magnitude_vector" in name for name in ours_grads) == len(ours_grads) // 3 * use_dora
    for name, grad in ours_grads.items():
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0, name
        reference = peft_grads[name]
        torch.testing.assert_close(grad, reference, **(tolerances(dtype, reference) if use_dora else EXACT),
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_dropout_in_training_mode_matches_peft(dtype):
    """With dropout active PEFT takes another path (the direction term sees dropout(x)); the same
    RNG draws must give the same result."""
    base = tiny_llama(64, 128, dtype=dtype)
    peft_model, ours = peft_and_ours(base, 4, 8, ["q_proj", "down_proj"], use_dora=True, use_rslora=False,
                                     dropout=0.3)
    peft_model.train()
    ours.train()
    embeds = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    probe = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(11)
    peft_logits, peft_input_grad = forward_backward(peft_model, embeds, probe)
    torch.manual_seed(11)
    ours_logits, ours_input_grad = forward_backward(ours, embeds, probe)
    torch.testing.assert_close(ours_logits, peft_logits, **tolerances(dtype, peft_logits))
    torch.testing.assert_close(ours_input_grad, peft_input_grad, **tolerances(dtype, peft_input_grad))


@pytest.mark.parametrize("out_features, in_features, r, scaling, block_elements", [
    (64, 128, 8, 2.0, 1 << 24),
    (96, 40, 3, 0.5, 40 * 7),  # several row blocks, the last one short
    (33, 17, 1, 5.0, 17),  # one row per block
])
def test_low_rank_weight_norm_equals_dense_norm(monkeypatch, out_features, in_features, r, scaling, block_elements):
    monkeypatch.setattr(dora, "_NORM_BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    lora_A = torch.randn(r, in_features, generator=generator)
    lora_B = torch.randn(out_features, r, generator=generator) * 0.3
    dense = torch.linalg.norm(weight.double() + scaling * lora_B.double() @ lora_A.double(), dim=1)
    ours = dora_weight_norm(weight, lora_A, lora_B, scaling)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), dense, rtol=2e-6, atol=0)
    torch.testing.assert_close(dora_weight_norm(weight).double(), torch.linalg.norm(weight.double(), dim=1),
                               rtol=1e-6, atol=0)


def test_nf4_dora_equals_dense_dequantized_dora():
    """DoRA on our NF4Linear (one dequantization shared by base matmul and norm) is exactly DoRA on
    an nn.Linear holding the dequantized weight, outputs and gradients."""
    layers, results = adapted_nf4_and_dense(DoRALinear)
    torch.testing.assert_close(layers[0].lora_magnitude_vector, layers[1].lora_magnitude_vector, **EXACT)
    assert results[0][0].dtype == torch.bfloat16 and len(results[0]) == 5  # + the magnitude's grad
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_init_is_the_base_row_norm_and_a_no_op(dtype):
    base = tiny_llama(64, 128, dtype=dtype)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                                use_dora=True))
    ours = copy.deepcopy(base)
    apply_lora(ours, AdapterSpec(["q_proj", "up_proj"], r=4, alpha=8, dropout=0.0, use_dora=True))
    peft_layers = dict(peft_model.base_model.model.named_modules())
    for name, layer in ours.named_modules():
        if isinstance(layer, DoRALinear):
            expected = torch.linalg.norm(layer.base.weight.double(), dim=1).float()
            torch.testing.assert_close(layer.lora_magnitude_vector, expected, rtol=1e-6, atol=0)
            # PEFT rounds its init to the base dtype (bf16 for a bf16 base); ours stays fp32.
            peft_magnitude = peft_layers[name].lora_magnitude_vector["default"].weight
            torch.testing.assert_close(peft_magnitude, expected.to(dtype).float(), rtol=1e-6, atol=0)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, **EXACT)  # B = 0 and scale = 1 exactly


def test_magnitudes_wait_for_the_weights_on_meta():
    with torch.device("meta"):
        model = tiny_llama()
    apply_lora(model, AdapterSpec(["v_proj"], r=2, alpha=4, dropout=0.0, use_dora=True))
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.lora_magnitude_vector.is_meta
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    assert init_dora_magnitudes(model) == 2
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.norm(layer.base.weight, dim=1),
                               rtol=1e-6, atol=0)


# Rank 1 of a fake 2-rank world: FSDP2 shards for real (NF4 base + DoRA), no collective runs.
_SHARDED_MAGNITUDE_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from fsdp_qlora.model.nf4 import nf4_row_shard, quantize_nf4
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.peft.dora import init_dora_magnitudes
from fsdp_qlora.peft.apply import apply_lora
from fsdp_qlora.peft.spec import AdapterSpec

weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
mesh = init_device_mesh("cpu", (2,))
model = nn.Sequential()
model.q_proj = NF4Linear(32, 64, device="meta")
apply_lora(model, AdapterSpec(["q_proj"], r=4, alpha=8, dropout=0.0, use_dora=True))
model.q_proj.materialize(torch.device("cpu"))
fully_shard(model, mesh=mesh)
rows = nf4_row_shard(quantize_nf4(weight), 32, 64)  # what the loader installs on rank 1
model.q_proj.base.weight = nn.Parameter(DTensor.from_local(rows, mesh, [Shard(0)], run_check=False,
                                        shape=torch.Size((64, 16)), stride=(16, 1)), requires_grad=False)
init_dora_magnitudes(model)
local = model.q_proj.lora_magnitude_vector.to_local()
expected = torch.linalg.norm(rows.dequantize().float(), dim=1)
assert local.shape == (32,) and torch.allclose(local, expected, rtol=1e-6, atol=0), (local, expected)
dist.destroy_process_group()
print("ok")
"""


def test_sharded_magnitude_init_uses_each_ranks_own_rows():
    proc = run_python("-c", _SHARDED_MAGNITUDE_SCRIPT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]
