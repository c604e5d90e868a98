"""LoRA layers and adapter export: PEFT (installed) is the oracle.

Our layer performs the same ops in the same order as PEFT's `lora.Linear`, so forward outputs
and every gradient are required to be bitwise equal (atol = rtol = 0), in fp32 and bf16 alike.
"""

from __future__ import annotations

import copy
import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from transformers import LlamaConfig, LlamaForCausalLM

from fsdp_qlora.config import DEFAULT_TARGET_MODULES
from fsdp_qlora.model.nf4 import quantize_nf4
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.peft import export
from fsdp_qlora.peft.apply import apply_lora, init_lora_parameters
from fsdp_qlora.peft.export import adapter_state_dict, load_peft_adapter, save_peft_adapter
from fsdp_qlora.peft.lora import LoRALinear
from fsdp_qlora.peft.spec import AdapterSpec
from fsdp_qlora.peft.targets import peft_target_modules
from tests.conftest import run_python

EXACT = {"atol": 0.0, "rtol": 0.0}


def tiny_llama(hidden: int = 64, intermediate: int = 128, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def linears_named(targets: list[str]) -> int:
    """Linears per Llama layer that `targets` adapt (all-linear: all 7)."""
    return 7 if targets == ["all-linear"] else len(targets)


def nf4_round_trip_linears(model: nn.Module) -> None:
    """Replace every linear weight by its bitsandbytes NF4 quantize -> dequantize image."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                packed, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                                   quant_type="nf4")
                module.weight.copy_(bnbf.dequantize_4bit(packed, state))


def peft_and_ours(base: nn.Module, r: int, alpha: float, targets: list[str]) -> tuple[nn.Module, nn.Module]:
    """The same base wrapped by PEFT and by us, sharing random (nonzero B) adapter weights."""
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=peft_target_modules(targets),
                                                                lora_dropout=0.0))
    apply_lora(ours, AdapterSpec(targets, r, alpha, dropout=0.0))
    generator = torch.Generator().manual_seed(123)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                peft_layer = peft_layers[name]
                for ours_weight, peft_weight in ((layer.lora_A.weight, peft_layer.lora_A["default"].weight),
                                                 (layer.lora_B.weight, peft_layer.lora_B["default"].weight)):
                    peft_weight.copy_(torch.randn(peft_weight.shape, generator=generator) * 0.1)
                    ours_weight.copy_(peft_weight)
    return peft_model, ours


def lora_grads(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Adapter gradients keyed by `<module>.lora_A`/`.lora_B`, the same for PEFT and ours."""
    return {name.removeprefix(prefix).replace(".default", "").removesuffix(".weight"): param.grad
            for name, param in model.named_parameters() if param.requires_grad}


def forward_backward(model: nn.Module, embeds: torch.Tensor, probe: torch.Tensor):
    embeds = embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits.float() * probe).sum().backward()
    return logits.detach(), embeds.grad


@pytest.mark.parametrize("dtype, nf4, r, alpha, hidden, intermediate, targets", [
    (torch.float32, False, 4, 8, 64, 128, DEFAULT_TARGET_MODULES),
    (torch.float32, False, 16, 7, 128, 192, ["q_proj", "v_proj", "down_proj"]),
    (torch.bfloat16, False, 8, 16, 64, 128, DEFAULT_TARGET_MODULES),
    (torch.bfloat16, True, 8, 32, 64, 192, DEFAULT_TARGET_MODULES),
    (torch.float32, True, 2, 4, 128, 128, ["k_proj", "o_proj", "gate_proj"]),
])
def test_llama_forward_and_grads_match_peft(dtype, nf4, r, alpha, hidden, intermediate, targets):
    base = tiny_llama(hidden, intermediate, dtype=dtype)
    if nf4:
        nf4_round_trip_linears(base)
    peft_model, ours = peft_and_ours(base, r, alpha, targets)
    generator = torch.Generator().manual_seed(7)
    embeds = torch.randn(2, 9, hidden, generator=generator).to(dtype)
    probe = torch.randn(2, 9, 128, generator=generator)

    peft_logits, peft_input_grad = forward_backward(peft_model, embeds, probe)
    ours_logits, ours_input_grad = forward_backward(ours, embeds, probe)

    torch.testing.assert_close(ours_logits, peft_logits, **EXACT)
    torch.testing.assert_close(ours_input_grad, peft_input_grad, **EXACT)
    peft_grads, ours_grads = lora_grads(peft_model, "base_model.model."), lora_grads(ours)
    assert sorted(ours_grads) == sorted(peft_grads) and len(ours_grads) == 2 * 2 * linears_named(targets)
    for name, grad in ours_grads.items():
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, peft_grads[name], **EXACT, msg=name)


class BiasedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)))


@pytest.mark.parametrize("dim, hidden, r", [(48, 80, 1), (33, 17, 5)])
def test_custom_module_with_bias_matches_peft(dim, hidden, r):
    torch.manual_seed(0)
    peft_model, ours = peft_and_ours(BiasedMLP(dim, hidden), r, 3.0, ["up_proj", "down_proj"])
    x = torch.randn(4, 3, dim)
    outputs, input_grads = [], []
    for model in (peft_model, ours):
        x_leaf = x.clone().requires_grad_(True)
        out = model(x_leaf)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        input_grads.append(x_leaf.grad)
    torch.testing.assert_close(outputs[1], outputs[0], **EXACT)
    torch.testing.assert_close(input_grads[1], input_grads[0], **EXACT)
    peft_grads = lora_grads(peft_model, "base_model.model.")
    for name, grad in lora_grads(ours).items():
        torch.testing.assert_close(grad, peft_grads[name], **EXACT, msg=name)


def adapted_nf4_and_dense(wrapper) -> tuple[list[nn.Module], list[tuple[torch.Tensor, ...]]]:
    """`wrapper` (LoRALinear, DoRALinear) around an NF4Linear and around an nn.Linear holding its
    dequantized weight, with the same random A and B; after one forward/backward of the same
    input, per layer: (output, input grad, then each trainable parameter's grad)."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    quantized = NF4Linear(128, 64)
    quantized.weight = nn.Parameter(quantize_nf4(weight), requires_grad=False)
    dense = nn.Linear(128, 64, bias=False, dtype=torch.bfloat16)
    dense.weight = nn.Parameter(quantized.weight.dequantize(), requires_grad=False)
    layers = [wrapper(quantized, r=8, lora_alpha=16), wrapper(dense, r=8, lora_alpha=16)]
    with torch.no_grad():
        layers[0].lora_B.weight.normal_()
        for name in ("lora_A", "lora_B"):
            getattr(layers[1], name).weight.copy_(getattr(layers[0], name).weight)
    x = torch.randn(3, 5, 128).to(torch.bfloat16)
    results = []
    for layer in layers:
        x_leaf = x.clone().requires_grad_(True)
        out = layer(x_leaf)
        out.float().sum().backward()
        results.append((out, x_leaf.grad, *[p.grad for p in layer.parameters() if p.requires_grad]))
    return layers, results


def test_nf4_linear_base_equals_dense_dequantized_base():
    """Wrapping our NF4Linear is the same as wrapping an nn.Linear holding the dequantized weight."""
    _, results = adapted_nf4_and_dense(LoRALinear)
    assert results[0][0].dtype == torch.bfloat16 and len(results[0]) == 4  # out, x grad, A grad, B grad
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_matches_peft_default(dtype):
    base = tiny_llama(dtype=dtype)
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16,
                                                                target_modules=peft_target_modules(DEFAULT_TARGET_MODULES)))
    torch.manual_seed(5)
    ours = copy.deepcopy(base)
    apply_lora(ours, AdapterSpec(DEFAULT_TARGET_MODULES, r=8, alpha=16, dropout=0.0))
    peft_layers = dict(peft_model.base_model.model.named_modules())
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        a = layer.lora_A.weight
        assert a.dtype == torch.float32 and layer.scaling == 2.0
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert a.abs().max() <= 1 / math.sqrt(layer.in_features)
        peft_a = peft_layers[name].lora_A["default"].weight
        # Same RNG draws as PEFT; with a bf16 base PEFT passes its fp32 init through bf16 (it moves
        # adapters to the base dtype, then autocasts them back to fp32), ours keeps full precision.
        expected = a if dtype == torch.float32 else a.to(dtype).float()
        torch.testing.assert_close(peft_a, expected, **EXACT, msg=name)


def test_apply_lora_on_meta_then_deterministic_init():
    def build() -> nn.Module:
        with torch.device("meta"):
            model = tiny_llama()
        names = apply_lora(model, AdapterSpec(DEFAULT_TARGET_MODULES, r=4, alpha=8, dropout=0.1))
        assert len(names) == 2 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
        layer = model.get_submodule(names[0])
        assert layer.lora_A.weight.is_meta and isinstance(layer.lora_dropout, nn.Dropout)
        return model.to_empty(device="cpu")

    first, second, other_seed = build(), build(), build()
    init_lora_parameters(first, seed=3)
    init_lora_parameters(second, seed=3)
    init_lora_parameters(other_seed, seed=4)
    trainable = {name for name, param in first.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    a_weights = []
    for name in sorted(trainable):
        param = first.get_parameter(name)
        if ".lora_A." in name:
            bound = 1 / math.sqrt(param.shape[1])
            assert param.abs().max() <= bound and param.abs().max() > 0.9 * bound, name
            a_weights.append(param)
        if ".lora_B." in name:
            assert torch.count_nonzero(param) == 0, name
        torch.testing.assert_close(param, second.get_parameter(name), **EXACT)
    assert not torch.equal(a_weights[0], a_weights[1])  # one generator stream, not one draw per layer
    assert not torch.equal(a_weights[0], other_seed.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight"))


# Rank 1 of a fake 2-rank world: FSDP2 shards for real, no collective runs. In a subprocess so the
# process-group/mesh state cannot leak into other tests.
_SHARDED_INIT_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from fsdp_qlora.peft.apply import apply_lora, init_lora_parameters
from fsdp_qlora.peft.spec import AdapterSpec

def build():
    model = nn.Sequential()
    model.q_proj = nn.Linear(16, 8)
    apply_lora(model, AdapterSpec(["q_proj"], r=4, alpha=8, dropout=0.0))
    return model

reference = build()
init_lora_parameters(reference, seed=0)
dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
sharded = build()
fully_shard(sharded, mesh=init_device_mesh("cpu", (2,)))
init_lora_parameters(sharded, seed=0)
weight = sharded.q_proj.lora_A.weight
assert isinstance(weight, DTensor)
assert torch.equal(weight.to_local(), reference.q_proj.lora_A.weight.chunk(2)[1])
assert torch.count_nonzero(sharded.q_proj.lora_B.weight.to_local()) == 0
dist.destroy_process_group()
print("ok")
"""


def test_init_after_fully_shard_gives_each_rank_its_shard_of_the_same_init():
    proc = run_python("-c", _SHARDED_INIT_SCRIPT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]


def test_apply_lora_names_available_layers_when_nothing_matches():
    with pytest.raises(ValueError, match=r"no module of this model is named 'qkv_proj'; its decoder linear layers "
                                         r"are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(tiny_llama(), AdapterSpec(["qkv_proj"], r=4, alpha=8, dropout=0.0))
    model = tiny_llama()
    apply_lora(model, AdapterSpec(["q_proj"], r=4, alpha=8, dropout=0.0))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, AdapterSpec(["q_proj"], r=4, alpha=8, dropout=0.0))


def test_adapter_state_dict_strips_wrapper_prefixes():
    tensor = torch.zeros(1)
    named = {
        ("_orig_mod.model.layers.0._fsdp_wrapped_module."
         "_checkpoint_wrapped_module.self_attn.q_proj.lora_A.weight"): tensor,
        "model.layers.1.mlp.down_proj.lora_B.weight": tensor,
        "model.layers.1.mlp.down_proj.base.weight": tensor,
        "model.embed_tokens.weight": tensor,
    }
    assert sorted(adapter_state_dict(named)) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
    ]
    with pytest.raises(ValueError, match="no lora_A/lora_B weights"):
        adapter_state_dict({"model.embed_tokens.weight": tensor})


def test_export_round_trip_through_peft(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "run" / "adapter"
    tiny_llama().save_pretrained(base_dir)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    ours = LlamaForCausalLM.from_pretrained(base_dir).eval()
    apply_lora(ours, AdapterSpec(targets, r=4, alpha=8, dropout=0.05))
    assert not any(module.training for module in ours.modules())  # eval survives wrapping (dropout off)
    init_lora_parameters(ours, seed=0)
    with torch.no_grad():  # "trained": B away from its zero init
        for name, param in ours.named_parameters():
            if ".lora_B." in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    ours.model.layers = nn.ModuleList(checkpoint_wrapper(layer) for layer in ours.model.layers)

    named = dict(ours.named_parameters())
    assert any("_checkpoint_wrapped_module" in name for name in named)
    state_dict = adapter_state_dict(named)
    save_peft_adapter(adapter_dir, state_dict, AdapterSpec(targets, r=4, alpha=8, dropout=0.05), str(base_dir),
                      target_modules=targets)

    config = LoraConfig.from_pretrained(adapter_dir)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.05)
    assert set(config.target_modules) == set(targets) and config.base_model_name_or_path == str(base_dir)
    assert config.task_type == "CAUSAL_LM" and config.inference_mode and not config.use_dora

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    loaded_config, loaded = load_peft_adapter(adapter_dir)
    assert loaded_config["target_modules"] == sorted(targets)
    assert all("wrapped" not in key and key.startswith("base_model.model.model.layers.") for key in loaded)
    peft_state = get_peft_model_state_dict(peft_model)
    assert sorted(peft_state) == sorted(loaded) and len(loaded) == 2 * 2 * linears_named(targets)
    for key, tensor in loaded.items():
        torch.testing.assert_close(peft_state[key], tensor, **EXACT, msg=key)

    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peft_model(input_ids).logits, **EXACT)


def test_save_replaces_atomically_and_load_reports_missing_files(tmp_path, monkeypatch):
    adapter_dir = tmp_path / "adapter"
    first = {"base_model.model.fc.lora_A.weight": torch.ones(2, 3, dtype=torch.bfloat16).t()}
    second = {"base_model.model.fc.lora_A.weight": torch.zeros(3, 2)}
    save_args = dict(spec=AdapterSpec(["fc"], r=2, alpha=4, dropout=0.0), base_model_name_or_path="tiny",
                     target_modules=["fc"])
    save_peft_adapter(adapter_dir, first, **save_args)
    _, loaded = load_peft_adapter(adapter_dir)
    assert loaded["base_model.model.fc.lora_A.weight"].dtype == torch.float32  # and non-contiguous input was fine

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(adapter_dir, second, **save_args)
    monkeypatch.undo()
    assert torch.equal(load_peft_adapter(adapter_dir)[1]["base_model.model.fc.lora_A.weight"], torch.ones(3, 2))

    save_peft_adapter(adapter_dir, second, **save_args)
    assert torch.equal(load_peft_adapter(adapter_dir)[1]["base_model.model.fc.lora_A.weight"], torch.zeros(3, 2))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left behind

    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['adapter_model.safetensors'\]"):
        load_peft_adapter(adapter_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere")
