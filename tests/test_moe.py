"""Mixture-of-experts architectures, from checkpoints their own transformers classes saved (tests/architectures.py).

For each of mixtral, qwen2_moe, qwen3_moe, olmoe and gpt_oss (4 experts, 2 per token; the checkpoint
in the layout `save_pretrained` writes: one 2-D weight per expert and projection, or gpt-oss' fused
3-D tensors): (a) our 1-process NF4 experts hold exactly bitsandbytes' `quantize_4bit` of each
expert's 2-D weight, and our logits equal transformers' eager experts loop on
``dequantize_4bit(quantize_4bit(w))`` experts with the other linears in bitsandbytes 4-bit;
(b) 2-rank FSDP (each rank holding 2 whole experts) and --sharding ddp hold the same bytes and give
the same logits;
(c) a 2-rank run adapts the experts, and PEFT (`target_parameters`) loads the exported adapter onto
the base and reproduces our logits. Bad expert layouts stop in one line before weights load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.architectures import (
    IDS,
    MOE_OVERRIDES,
    assert_peft_reproduces,
    assert_refused_before_weights,
    layout_outputs,
    make_checkpoint,
    train_each,
)
from tests.oracles import bnb_moe_reference, bnb_nf4_digests, logits_of

ARCHS = list(MOE_OVERRIDES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_checkpoint(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def layouts(checkpoints, tmp_path_factory) -> dict[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("moe-layouts")
    return {layout: layout_outputs(root / layout, checkpoints, layout) for layout in ("single", "fsdp", "ddp")}


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, tuple]:
    return {arch: bnb_moe_reference(path) for arch, path in checkpoints.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_experts_and_logits_equal_bitsandbytes_per_expert(arch, layouts, references):
    """Tolerance: none. Each expert is quantized by the same bitsandbytes calls as its 2-D weight on its
    own, dequantized by the same kernel into bf16, and multiplied in transformers' eager loop's own
    operations (F.linear, or x @ W + b for gpt-oss), one expert at a time; the router, attention and
    norms are transformers' modules. So the logits are equal bit for bit, not merely close."""
    ours = layouts["single"][arch]
    reference, expert_digests = references[arch]
    ours_experts = {key: value for key, value in ours["digests"].items() if key in expert_digests}
    assert len(expert_digests) == 2 * 2 * 4 * 5  # layers x weights x experts x (4 NF4 parts + dequantized)
    assert ours_experts == expert_digests
    assert {k: v for k, v in ours["digests"].items() if k not in expert_digests} == bnb_nf4_digests(reference)
    assert torch.equal(ours["logits"], logits_of(reference, IDS))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_two_rank_layouts_hold_the_one_process_experts(arch, layout, layouts):
    """fsdp: each rank quantizes and holds 2 of the 4 experts; ddp: both hold all 4."""
    single, other = layouts["single"][arch], layouts[layout][arch]
    assert other["digests"] == single["digests"]  # every expert's NF4 bytes, as all-gathered
    assert torch.equal(other["logits"], single["logits"])


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    return train_each(checkpoints, tmp_path_factory.mktemp("moe-trained"))


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_are_adapted_and_peft_reproduces_our_logits(arch, checkpoints, layouts, references, trained):
    from peft import PeftModel

    runs, with_adapter = trained
    adapter = runs / arch / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert "gate" not in config["target_modules"] and "shared_expert_gate" not in config["target_modules"]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    experts = {key: value for key, value in weights.items() if ".mlp.experts." in key}
    assert len(experts) == 2 * 2 * 2  # layers x (gate_up_proj, down_proj) x (A, B)
    assert all(value.abs().max() > 0 for value in experts.values())  # B trained away from its zero init

    reference, _ = references[arch]
    peft = PeftModel.from_pretrained(reference, adapter).eval()
    # PEFT adds each expert's update to its bf16 weight before the matmul; we add (x A^T) B^T to the
    # base output: the same function, rounded in other places, so most positions differ by bf16
    # steps as on dense layers (measured: at most 1.8 steps). A router's top-k choice is not
    # continuous, though: where two experts' scores are within rounding of each other, the two
    # computations can send a token to different experts, and that token's logits then differ by
    # more (measured once: one position of 24 at 34 steps, mixtral; another run: olmoe at 25), and
    # through causal attention the later positions of its sequence a little (olmoe, a flip at the
    # 9th of 12 tokens: 23.7 steps there, then 4.0, 4.6 and 4.8). So: 4 steps at all but 4 of the 24
    # positions, and the mean gap under 10% of the adapter's effect (olmoe then: 7.4%).
    assert_peft_reproduces(with_adapter[arch]["logits"], logits_of(peft, IDS), layouts["single"][arch]["logits"], arch,
                           outlier_positions=4)
    metrics = [json.loads(line) for line in (runs / arch / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


# ---- bad input: one line, exit 2, before weights load ------------------------------------------
def _edited_copy(source: Path, target: Path, config_changes: dict | None = None, tensors=None) -> Path:
    """A copy of a checkpoint with config.json values changed and/or its tensors rewritten by `tensors`."""
    shutil.copytree(source, target)
    if config_changes:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    if tensors:
        for file in target.glob("*.safetensors"):
            save_file(tensors(load_file(str(file))), str(file), metadata={"format": "pt"})
    return target


def _mxfp4(state: dict) -> dict:
    """gpt-oss as the hub stores it: each fused expert weight as <name>_blocks + <name>_scales (uint8)."""
    result = {}
    for key, value in state.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, rows, cols = value.shape
            result[key + "_blocks"] = torch.zeros(experts, cols, rows // 32, 16, dtype=torch.uint8)
            result[key + "_scales"] = torch.zeros(experts, cols, rows // 32, dtype=torch.uint8)
        else:
            result[key] = value
    return result


def _drop_expert(state: dict) -> dict:
    return {key: value for key, value in state.items() if ".experts.3." not in key}


@pytest.mark.parametrize("case", ["more-experts-in-config", "expert-missing", "mxfp4", "target-not-an-expert",
                                  "dora-on-experts"])
def test_bad_expert_layouts_stop_in_one_line_before_weights_load(case, checkpoints, tmp_path):
    edited = tmp_path / "edited"
    model, expected = {
        "more-experts-in-config": (lambda: _edited_copy(checkpoints["mixtral"], edited, {"num_local_experts": 8}),
                                   "the checkpoint holds 4 experts for model.layers.0.mlp.experts.gate_up_proj "
                                   "(numbered 0-3), config.json says 8"),
        "expert-missing": (lambda: _edited_copy(checkpoints["qwen3_moe"], edited, tensors=_drop_expert),
                           "holds 3 experts for model.layers.0.mlp.experts.gate_up_proj (numbered 0-2), config.json "
                           "says 4"),
        "mxfp4": (lambda: _edited_copy(checkpoints["gpt_oss"], edited, tensors=_mxfp4), "is stored in MXFP4"),
        "target-not-an-expert": (lambda: checkpoints["olmoe"], "no expert weight of this model is named 'experts.w1'; "
                                 "its expert weights are experts.down_proj, experts.gate_up_proj"),
        "dora-on-experts": (lambda: checkpoints["mixtral"], "PEFT adapts expert weights with LoRA only"),
    }[case]
    extra = {"target-not-an-expert": ["--lora-target-parameters", "experts.w1"],
             "dora-on-experts": ["--train-type", "qdora", "--lora-target-parameters", "experts.down_proj"]}
    assert_refused_before_weights(["--model", str(model()), *extra.get(case, [])], expected, tmp_path)


def test_world_size_must_divide_the_experts():
    """Each rank holds whole NF4 experts: 3 experts over 2 ranks is one line naming the fix."""
    from transformers import AutoConfig

    from fsdp_qlora.errors import ConfigError
    from fsdp_qlora.model.loader import quantize_decoder_linears
    from fsdp_qlora.model.structure import meta_model
    from tests.architectures import COMMON

    model = meta_model(AutoConfig.for_model("mixtral", **{**COMMON, **MOE_OVERRIDES["mixtral"], "num_local_experts": 3}))
    with pytest.raises(ConfigError, match="3 experts cannot be split evenly over 2 ranks .* use a world size that divides 3"):
        quantize_decoder_linears(model, shard_count=2)
