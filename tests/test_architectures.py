"""Every supported architecture, from a checkpoint its own transformers class saved (tests/architectures.py).

For each: (a) our 1-process NF4 logits equal transformers + bitsandbytes 4-bit bit for bit, and the
NF4 bytes are bitsandbytes'; (b) 2-rank FSDP and --sharding ddp hold the same bytes and give the
same logits; (c) a 2-rank QLoRA run writes an adapter that PEFT loads onto the base and that
reproduces our logits; (d) by default every linear of every decoder layer has an adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.architectures import (
    IDS,
    LAYOUTS,
    OVERRIDES,
    assert_peft_reproduces,
    assert_refused_before_weights,
    layout_outputs,
    make_checkpoint,
    train_each,
)
from tests.conftest import subprocess_env
from tests.oracles import bnb_4bit_model, bnb_nf4_digests, logits_of

ARCHS = list(OVERRIDES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_checkpoint(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def layouts(checkpoints, tmp_path_factory) -> dict[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("layouts")
    return {layout: layout_outputs(root / layout, checkpoints, layout) for layout in LAYOUTS}


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_bytes_and_logits_equal_transformers_bitsandbytes(arch, checkpoints, layouts):
    """Bit for bit, not within a tolerance: the same bytes (bitsandbytes' quantize_4bit of each whole
    weight), dequantized by the same bitsandbytes kernel into bf16, multiplied by the same F.linear
    with the bias inside it, everything else being transformers' own modules. Any difference would
    be a real divergence (it found FSDP2 rounding OLMo 2's fp32 rotary cos/sin to bf16)."""
    ours = layouts["single"][arch]
    reference = bnb_4bit_model(checkpoints[arch])
    assert ours["digests"] == bnb_nf4_digests(reference)
    assert torch.equal(ours["logits"], logits_of(reference, IDS))


FP32_ARCHS = ["llama", "gemma2", "phi3"]  # plain, soft-capped with (1 + w) norms, fused projections


def test_fp32_compute_equals_transformers_bitsandbytes_at_fp32(checkpoints, tmp_path):
    """--compute-dtype fp32 (auto's choice on a CPU without native bf16): the same NF4 bytes, dequantized
    into fp32 by bitsandbytes' kernel, give transformers + bitsandbytes' fp32 logits bit for bit, so
    the suite's oracles hold at whichever dtype a machine resolves `auto` to (tests/oracles.py)."""
    chosen = {arch: checkpoints[arch] for arch in FP32_ARCHS}
    env = {**subprocess_env(tmp_path / "cache"), "ARCH_COMPUTE_DTYPE": "fp32"}
    ours = layout_outputs(tmp_path / "fp32", chosen, "single", env=env)
    for arch, model_dir in chosen.items():
        reference = bnb_4bit_model(model_dir, dtype=torch.float32)
        assert ours[arch]["digests"] == bnb_nf4_digests(reference), arch
        assert torch.equal(ours[arch]["logits"], logits_of(reference, IDS)), arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_two_rank_layouts_hold_the_one_process_base(arch, layout, layouts):
    single, other = layouts["single"][arch], layouts[layout][arch]
    assert other["digests"] == single["digests"]  # NF4 bytes and dequantized weights, every decoder linear
    assert torch.equal(other["logits"], single["logits"])


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    return train_each(checkpoints, tmp_path_factory.mktemp("trained"))


def _decoder_linears(model_dir: Path) -> set[str]:
    """Qualified names of every nn.Linear inside every decoder layer of transformers' own class."""
    from transformers import AutoConfig

    from fsdp_qlora.model.structure import decoder_layers, meta_model

    model = meta_model(AutoConfig.from_pretrained(model_dir))
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return {f"{prefix}.{name}" for name, module in layers.named_modules() if isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decoder_linear_is_adapted_and_peft_reproduces_our_logits(arch, checkpoints, layouts, trained):
    from peft import PeftModel

    from fsdp_qlora.peft.export import adapted_modules

    runs, with_adapter = trained
    adapter = runs / arch / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(adapted_modules(weights)) == _decoder_linears(checkpoints[arch])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted({name.rsplit(".", 1)[-1] for name in adapted_modules(weights)})

    peft = PeftModel.from_pretrained(bnb_4bit_model(checkpoints[arch]), adapter).eval()
    assert_peft_reproduces(with_adapter[arch]["logits"], logits_of(peft, IDS), layouts["single"][arch]["logits"], arch)
    metrics = [json.loads(line) for line in (runs / arch / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.mark.parametrize("case", ["unknown-target", "regex-matches-nothing", "gguf-not-a-model"])
def test_bad_model_input_is_one_line_exit_2_before_weights_load(case, checkpoints, tmp_path):
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all" * 10)
    args, expected = {
        "unknown-target": (["--model", str(checkpoints["phi3"]), "--lora-target-modules", "q_proj,v_proj"],
                           "no module of this model is named 'q_proj'; its decoder linear layers are down_proj, "
                           "gate_up_proj, o_proj, qkv_proj"),
        "regex-matches-nothing": (["--model", str(checkpoints["starcoder2"]), "--lora-target-regex", r".*\.mlp\.up_proj"],
                                  "matches no module of this model"),
        "gguf-not-a-model": (["--model", str(bad_gguf)], "is not a GGUF file"),
    }[case]
    assert_refused_before_weights(args, expected, tmp_path)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "llama"])
def test_chunked_loss_equals_the_models_own_logits_loss(arch, checkpoints):
    """The chunked loss computes lm_head itself, so it must apply what the model's forward applies
    after lm_head: Gemma's final logit soft-cap (registry data); without it the loss is far off."""
    from transformers import AutoModelForCausalLM

    from fsdp_qlora.train.loss import chunked_loss_sum, full_logits_loss_sum

    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.bfloat16).eval()
    labels = IDS.clone()
    labels[:, :3] = -100  # a masked prompt
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    with torch.no_grad():
        full, chunked = full_logits_loss_sum(model, batch), chunked_loss_sum(model, batch, chunk_tokens=5)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)  # fp32 sums in another order
