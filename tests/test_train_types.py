"""Every --train-type for real: a 2-rank FSDP2 torchrun on the tiny model, then PEFT on the export.

Each run also exercises an adapter variant (rsLoRA, LoRA+, regex targets, rank patterns), so that
the exported config fields are the ones PEFT must honour to reproduce our function.

Two comparisons of the exported adapter with PEFT (the oracle):
  * in-process, tight: our layers (NF4Linear base for qlora/qdora, quantized exactly as the
    loader does at world size 1; bf16 nn.Linear for lora/dora) with the adapter installed, against
    PeftModel on the very same base weights (the NF4 dequantization as bf16 nn.Linears). Same
    dtypes (bf16 base, fp32 adapters) on both sides: LoRA must be bitwise equal (test_lora shows
    the ops are PEFT's); DoRA within bf16 rounding (test_dora explains: one fp32 norm rounding may
    flip one bf16 rounding), i.e. rtol 1.6e-2 and atol 2^-8 of the logit scale;
  * the training build (FSDP2 at world size 1, bf16 mixed precision, sharded loader and magnitude
    init) through tests/workers/our_logits_worker.py: bf16-cast adapters make it looser, the
    tolerance of test_train_e2e (3% of the logit scale, argmax agreeing on 95% of positions).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from fsdp_qlora.config import DORA_TRAIN_TYPES, QUANTIZED_TRAIN_TYPES, TrainConfig, load_yaml_overrides
from fsdp_qlora.model.nf4 import quantize_nf4
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.model.structure import decoder_layers
from fsdp_qlora.peft.apply import apply_lora
from fsdp_qlora.peft.export import install_adapter, load_peft_adapter
from fsdp_qlora.peft.spec import AdapterSpec
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env

STEPS = 12
VARIANT_FLAGS = {
    "qlora": ["--use-rslora"],
    "qdora": ["--loraplus-lr-ratio", "4"],
    "lora": ["--lora-target-regex", r"model\.layers\.[02]\..*(q_proj|v_proj|down_proj)"],
    "dora": ["--lora-rank-pattern", "down_proj=4", "--use-rslora"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=sorted(VARIANT_FLAGS))
def run(request, cache, tmp_path_factory) -> tuple[str, Path]:
    train_type = request.param
    run_dir = tmp_path_factory.mktemp("runs") / train_type
    run_torchrun(REPO / "train.py", 2, "--train-type", train_type, "--max-steps", str(STEPS),
                 "--output-dir", str(run_dir), *VARIANT_FLAGS[train_type], env=subprocess_env(cache))
    return train_type, run_dir


def test_loss_falls(run):
    _, run_dir = run
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert end < start - 0.3, losses  # from ~ln(1024) = 6.9; every type gets well below within 12 steps


def test_export_format(run):
    train_type, run_dir = run
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    cfg = TrainConfig(**load_yaml_overrides(str(run_dir / "config.yaml")))
    assert config["use_dora"] == (train_type in DORA_TRAIN_TYPES)
    assert config["use_rslora"] == cfg.use_rslora
    assert config["rank_pattern"] == cfg.rank_pattern()
    assert isinstance(config["target_modules"], list) and config["target_modules"]
    if cfg.lora_target_regex:  # the regex is written as the modules it matched
        assert config["target_modules"] == [f"model.layers.{i}.{m}" for i in (0, 2)
                                            for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert not any(wrapper in key for key in tensors for wrapper in ("_fsdp_wrapped_module", "_checkpoint_wrapped"))
    magnitudes = [key for key in tensors if key.endswith(".lora_magnitude_vector")]
    if train_type in DORA_TRAIN_TYPES:
        assert len(magnitudes) * 3 == len(tensors)
    else:  # the rules vLLM applies when it loads a LoRA adapter
        assert isinstance(config["r"], int) and config["lora_alpha"] and config["modules_to_save"] is None
        assert not magnitudes and all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    assert any(t.abs().sum() > 0 for key, t in tensors.items() if ".lora_B." in key), "B never trained"


def _bases(base_dir: Path, quantized: bool) -> tuple[nn.Module, nn.Module]:
    """(ours, PEFT's): the same bf16 model, ours with NF4Linear decoder linears when `quantized`
    (one quantization slice, as the loader makes at world size 1), PEFT's with nn.Linears holding
    exactly what those NF4 weights dequantize to."""
    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    if quantized:
        reference_modules = dict(reference.named_modules())
        for name, module in list(ours.named_modules()):
            if isinstance(module, nn.Linear) and ".layers." in name:
                nf4 = NF4Linear(module.in_features, module.out_features)
                nf4.weight = nn.Parameter(quantize_nf4(module.weight.detach()), requires_grad=False)
                parent, _, child = name.rpartition(".")
                setattr(ours.get_submodule(parent), child, nf4)
                with torch.no_grad():
                    reference_modules[name].weight.copy_(nf4.weight.dequantize())
        assert sum(isinstance(m, NF4Linear) for m in decoder_layers(ours).modules()) == 7 * len(decoder_layers(ours))
    return ours, reference


def test_peft_loads_the_adapter_with_our_logits(run, cache, tmp_path):
    train_type, run_dir = run
    adapter_dir = run_dir / "adapter"
    cfg = TrainConfig(**load_yaml_overrides(str(run_dir / "config.yaml")))
    base_dir = Path(json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    ids = {"input_ids": torch.randint(4, 1000, (2, 20), generator=torch.Generator().manual_seed(0)),
           "attention_mask": torch.ones(2, 20, dtype=torch.long)}

    ours, reference = _bases(base_dir, train_type in QUANTIZED_TRAIN_TYPES)
    apply_lora(ours, dataclasses.replace(AdapterSpec.from_config(cfg), dropout=0.0))
    _, tensors = load_peft_adapter(adapter_dir)
    install_adapter(ours, tensors)
    peft_model = PeftModel.from_pretrained(reference, adapter_dir).eval()
    peft_state = get_peft_model_state_dict(peft_model)
    assert sorted(peft_state) == sorted(tensors)  # PEFT took every tensor, and found no others missing
    with torch.no_grad():
        ours_logits, peft_logits = ours(**ids).logits.float(), peft_model(**ids).logits.float()
    if train_type in DORA_TRAIN_TYPES:
        # Both run DoRA in bf16 but in different orders (our row norm from an fp32 expansion, PEFT's
        # from the fp32 W + s*B*A; bf16 roundings of (scale - 1) * base and of the residual adds
        # differ), through 4 layers: a few bf16 ulps of the largest logit (2^-8 relative each),
        # observed up to 2 ulps on 0.1% of the logits. The adapter's own effect is ~10x larger, so
        # a wrong scale, norm or magnitude would not pass.
        atol = peft_logits.abs().max().item() * 2**-6
        with peft_model.disable_adapter():
            base_logits = peft_model(**ids).logits.float()
        assert (peft_logits - base_logits).abs().max().item() > 10 * atol
        torch.testing.assert_close(ours_logits, peft_logits, rtol=1.6e-2, atol=atol)
    else:
        torch.testing.assert_close(ours_logits, peft_logits, rtol=0, atol=0)

    if train_type == "qlora":
        return  # its training build is compared with PEFT in test_train_e2e
    # The training build itself (FSDP2, world size 1, mixed precision) on the same ids.
    save_file(ids, str(tmp_path / "ids.safetensors"))
    proc = run_python(str(REPO / "tests/workers/our_logits_worker.py"), str(run_dir), str(tmp_path / "ids.safetensors"),
                      str(tmp_path / "ours.safetensors"), env=subprocess_env(cache),
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_file(str(tmp_path / "ours.safetensors"))["logits"]
    assert (trained - peft_logits).abs().max() < 0.03 * peft_logits.abs().max()
    # 40 positions of a random tiny model whose top logits are often within bf16 rounding of each
    # other: 2 flips seen (qdora), so 90%; the max-difference bounds above are the sharp checks.
    assert (trained.argmax(-1) == peft_logits.argmax(-1)).float().mean() >= 0.9
    with torch.no_grad():  # and the adapter matters at that scale: not a comparison of two bases
        with peft_model.disable_adapter():
            plain = peft_model(**ids).logits.float()
    assert (plain - peft_logits).abs().max() > 3 * (trained - peft_logits).abs().max()
