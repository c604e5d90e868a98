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

from tests.architectures import OVERRIDES, make_checkpoint
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env
from tests.oracles import bnb_4bit_model, bnb_nf4_digests, logits_of

ARCHS = list(OVERRIDES)
IDS = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))  # = arch_layout_worker.IDS
LAYOUTS = {"single": (1, "fsdp"), "fsdp": (2, "fsdp"), "ddp": (2, "ddp")}
TRAIN_FLAGS = ["--max-steps", "3", "--batch-size", "2", "--context-length", "64", "--lr", "1e-2",
               "--warmup-steps", "0", "--lora-dropout", "0", "--save-every", "0"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_checkpoint(arch, root / arch) for arch in ARCHS}


def layout_outputs(out: Path, checkpoints: dict[str, Path], layout: str, runs: str = "-",
                   env: dict | None = None) -> dict[str, dict]:
    """tests/workers/arch_layout_worker.py under one layout: per model, its logits and base digests."""
    nproc, sharding = LAYOUTS[layout]
    out.mkdir(parents=True)
    run_torchrun(REPO / "tests/workers/arch_layout_worker.py", nproc, str(out), sharding, runs,
                 *map(str, checkpoints.values()), env=env, timeout=600)
    return {name: {"logits": load_file(str(out / f"{path.name}.safetensors"))["logits"],
                   "digests": json.loads((out / f"{path.name}.json").read_text())} for name, path in checkpoints.items()}


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_two_rank_layouts_hold_the_one_process_base(arch, layout, layouts):
    single, other = layouts["single"][arch], layouts[layout][arch]
    assert other["digests"] == single["digests"]  # NF4 bytes and dequantized weights, every decoder linear
    assert torch.equal(other["logits"], single["logits"])


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A 2-rank QLoRA run of train.py per architecture, then our logits with each adapter (one launch).

    (One torchrun per run: re-creating the default process group several times in one process is
    not reliable in torch 2.13's gloo, whose third re-initialization can pair a rank's barrier with
    the next run's broadcast.)"""
    root = tmp_path_factory.mktemp("trained")
    runs = root / "runs"
    for arch, model_dir in checkpoints.items():
        run_torchrun(REPO / "train.py", 2, "--model", str(model_dir), "--output-dir", str(runs / arch), *TRAIN_FLAGS,
                     env=subprocess_env(root / "cache"), timeout=300)
    return runs, layout_outputs(root / "logits", checkpoints, "single", str(runs))


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
    theirs, ours, base = logits_of(peft, IDS), with_adapter[arch]["logits"], layouts["single"][arch]["logits"]
    # Same NF4 base (bit-exact above) and adapter weights; we run the adapter matmuls in bf16 (FSDP2's
    # mixed precision casts the fp32 adapters for compute) where PEFT keeps them in fp32, so the
    # hidden states round differently after the first adapted layer and the logits differ by bf16
    # rounding: measured at most 2.5 bf16 steps (at the largest logit) over the 9 architectures, a
    # mean gap ~4% of the adapter's mean effect. Bounds: 4 steps; 10%; and an effect of 20+ steps.
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs().max())) - 7)  # bf16 spacing at the largest logit
    gap, effect = (ours - theirs).abs(), (theirs - base).abs()
    assert effect.max() > 20 * ulp, ("the adapter barely changed the logits: it did not train", effect.max(), ulp)
    assert gap.max() <= 4 * ulp and gap.mean() < 0.1 * effect.mean(), (arch, gap.max(), gap.mean(), effect.mean())
    metrics = [json.loads(line) for line in (runs / arch / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    """A mixture-of-experts checkpoint (fused 3-D experts in transformers 5), which this version refuses."""
    return make_checkpoint("mixtral", tmp_path_factory.mktemp("moe") / "mixtral", num_local_experts=4,
                           num_experts_per_tok=2)


def _train_cli(*args: str, cache: Path) -> tuple[int, str]:
    proc = run_python(str(REPO / "train.py"), *args, env=subprocess_env(cache), timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", ["unknown-target", "regex-matches-nothing", "gguf-not-a-model", "moe"])
def test_bad_model_input_is_one_line_exit_2_before_weights_load(case, checkpoints, moe_checkpoint, tmp_path):
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all" * 10)
    args, expected = {
        "unknown-target": (["--model", str(checkpoints["phi3"]), "--lora-target-modules", "q_proj,v_proj"],
                           "no module of this model is named 'q_proj'; its decoder linear layers are down_proj, "
                           "gate_up_proj, o_proj, qkv_proj"),
        "regex-matches-nothing": (["--model", str(checkpoints["starcoder2"]), "--lora-target-regex", r".*\.mlp\.up_proj"],
                                  "matches no module of this model"),
        "gguf-not-a-model": (["--model", str(bad_gguf)], "is not a GGUF file"),
        "moe": (["--model", str(moe_checkpoint)], "mixture-of-experts"),
    }[case]
    code, stderr = _train_cli(*args, "--output-dir", str(tmp_path / "run"), "--max-steps", "1", cache=tmp_path / "c")
    lines = [line for line in stderr.splitlines() if line.startswith("train.py:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained or saved


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
