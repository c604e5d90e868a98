"""Tiny random checkpoints of every supported architecture, made by transformers' own classes.

Each is what `save_pretrained` writes for a real checkpoint of that model type (its real key names,
sharded safetensors with an index), at a size that runs in seconds on CPU: 2 decoder layers, hidden
128, 4 heads of 32 (2 KV heads), vocabulary 1024 with the tiny Llama's tokenizer (ids 1/2/3 =
bos/eos/pad). Every linear's rows split into whole 64-element NF4 blocks on 2 ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from fsdp_qlora.model.registry import ARCHITECTURES
from fsdp_qlora.model.tiny_llama import BOS_ID, EOS_ID, PAD_ID, TINY_LLAMA_CONFIG, train_tokenizer, training_texts
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env

COMMON = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 256,
          "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "initializer_range": 0.05}
# What each model type needs on top (its own defaults otherwise): the features that make it differ.
OVERRIDES: dict[str, dict] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"sliding_window": 8},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": True},
    "gemma2": {"query_pre_attn_scalar": 32, "sliding_window": 8, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3_text": {"query_pre_attn_scalar": 32, "sliding_window": 8, "final_logit_softcapping": 30.0,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"tie_word_embeddings": False},
    "starcoder2": {"tie_word_embeddings": False},
    "olmo2": {"tie_word_embeddings": False},
}
# Mixture-of-experts architectures (tests/test_moe.py): 4 experts, 2 per token; each expert's weights
# (and the experts dim, for 2 ranks) split into whole NF4 blocks.
MOE_OVERRIDES: dict[str, dict] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                  "shared_expert_intermediate_size": 256, "tie_word_embeddings": False},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "tie_word_embeddings": False},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 2.0,
                                    "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False}},
}
assert set(OVERRIDES) | set(MOE_OVERRIDES) == set(ARCHITECTURES), "every registered architecture has a tiny checkpoint"


def make_checkpoint(model_type: str, output_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random-init bf16 checkpoint of `model_type`, sharded as `save_pretrained` shards a real one."""
    defaults = OVERRIDES.get(model_type) or MOE_OVERRIDES.get(model_type, {})
    config = AutoConfig.for_model(model_type, **{**COMMON, **defaults, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases (init leaves them at 1 / 0), so that loading them shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.to(torch.bfloat16).save_pretrained(output_dir, max_shard_size="300KB")
    train_tokenizer(training_texts(), TINY_LLAMA_CONFIG["vocab_size"], COMMON["max_position_embeddings"]
                    ).save_pretrained(output_dir)
    return output_dir


# ---- what the architecture tests run (tests/test_architectures.py, tests/test_moe.py) --------------
IDS = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))  # = arch_layout_worker.IDS
LAYOUTS = {"single": (1, "fsdp"), "fsdp": (2, "fsdp"), "ddp": (2, "ddp")}
TRAIN_FLAGS = ["--max-steps", "3", "--batch-size", "2", "--context-length", "64", "--lr", "1e-2",
               "--warmup-steps", "0", "--lora-dropout", "0", "--save-every", "0"]


def layout_outputs(out: Path, checkpoints: dict[str, Path], layout: str, runs: str = "-",
                   env: dict | None = None) -> dict[str, dict]:
    """tests/workers/arch_layout_worker.py under one layout: per model, its logits and base digests."""
    nproc, sharding = LAYOUTS[layout]
    out.mkdir(parents=True)
    run_torchrun(REPO / "tests/workers/arch_layout_worker.py", nproc, str(out), sharding, runs,
                 *map(str, checkpoints.values()), env=env, timeout=600)
    return {name: {"logits": load_file(str(out / f"{path.name}.safetensors"))["logits"],
                   "digests": json.loads((out / f"{path.name}.json").read_text())} for name, path in checkpoints.items()}


def train_each(checkpoints: dict[str, Path], root: Path) -> tuple[Path, dict[str, dict]]:
    """A 2-rank QLoRA run of train.py per checkpoint, then our logits with each adapter (one launch).

    (One torchrun per run: re-creating the default process group several times in one process is
    not reliable in torch 2.13's gloo, whose third re-initialization can pair a rank's barrier with
    the next run's broadcast.)"""
    runs = root / "runs"
    for arch, model_dir in checkpoints.items():
        run_torchrun(REPO / "train.py", 2, "--model", str(model_dir), "--output-dir", str(runs / arch), *TRAIN_FLAGS,
                     env=subprocess_env(root / "cache"), timeout=300)
    return runs, layout_outputs(root / "logits", checkpoints, "single", str(runs))


def assert_peft_reproduces(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor, arch: str,
                           max_steps: float = 4, outlier_positions: int = 0) -> None:
    """PEFT's logits with our adapter (`theirs`) equal ours up to bf16 rounding of the adapter path.

    Same NF4 base (bit-exact, tested apart) and adapter weights; we run the adapter matmuls in bf16
    (FSDP2's mixed precision casts the fp32 adapters for compute) where PEFT keeps them in fp32, so
    the hidden states round differently after the first adapted layer and the logits differ by bf16
    rounding: measured at most 2.5 bf16 steps (at the largest logit) over the 9 dense architectures,
    a mean gap ~4% of the adapter's mean effect. Bounds: `max_steps` steps at every position but
    `outlier_positions` (a position is one token's logits); 10%; and an effect of 20+ steps (the
    adapter trained)."""
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs().max())) - 7)  # bf16 spacing at the largest logit
    gap, effect = (ours - theirs).abs(), (theirs - base).abs()
    assert effect.max() > 20 * ulp, ("the adapter barely changed the logits: it did not train", effect.max(), ulp)
    per_position = (gap.amax(-1) / ulp).flatten()
    outliers = int((per_position > max_steps).sum())
    assert outliers <= outlier_positions and gap.mean() < 0.1 * effect.mean(), (
        arch, per_position.tolist(), gap.mean() / effect.mean())


def assert_refused_before_weights(args: list[str], expected: str, tmp_path: Path) -> None:
    """train.py with `args` stops with one `train.py:` line containing `expected`, exit 2, no traceback,
    nothing trained or saved."""
    proc = run_python(str(REPO / "train.py"), *args, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                      env=subprocess_env(tmp_path / "cache"), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
