"""The Quickstart path for real: `torchrun --nproc_per_node 2 train.py` on the tiny default."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from fsdp_qlora.model.nf4 import quantize_nf4
from fsdp_qlora.model.sources import resolve_model
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env

STEPS = 30
EVAL_EVERY = 15
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_sec")
# Every TensorBoard tag the docs list (README "Monitoring"); memory/* is host RSS on CPU, GPU memory on CUDA.
TENSORBOARD_TAGS = {"train/loss": STEPS, "train/lr": STEPS, "train/grad_norm": STEPS, "train/tokens_per_sec": STEPS,
                    "train/mfu": STEPS, "memory/host_rss_gib": STEPS, "eval/loss": 2, "eval/perplexity": 2,
                    "checkpoint/saved_step": 1, "data/efficiency": 1}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 2-rank QLoRA run of the default (tiny Llama, bundled data), shared by the tests."""
    cache = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("runs") / "qlora"
    env = subprocess_env(cache)
    run_torchrun(REPO / "train.py", 2, "--max-steps", str(STEPS), "--output-dir", str(run_dir),
                 "--lora-dropout", "0.05", "--eval-fraction", "0.05", "--eval-every", str(EVAL_EVERY), env=env)
    return run_dir, cache


def _metrics(run_dir: Path, kind: str = "loss") -> list[dict]:
    """metrics.jsonl rows holding `kind`: train steps ("loss") or evaluations ("eval_loss")."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind in r]


def test_loss_falls_and_metrics_are_written(trained_run):
    run_dir, _ = trained_run
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(set(SCALARS) <= set(r) for r in rows)
    first, last = rows[:5], rows[-5:]
    start, end = (sum(r["loss"] for r in part) / len(part) for part in (first, last))
    # From ~ln(vocab)=6.9 the tiny model's LoRA reliably gets below 6.2 within 30 steps.
    assert end < start - 0.7, (start, end)
    assert max(r["lr"] for r in rows) == pytest.approx(1e-3)  # tiny-llama's recommended peak LR
    assert all(r["tokens_per_sec"] > 0 and r["grad_norm"] > 0 for r in rows)


def test_tensorboard_holds_the_same_scalars(trained_run):
    run_dir, _ = trained_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    losses = {r["step"]: r["loss"] for r in _metrics(run_dir)}
    assert {tag: len(events.Scalars(tag)) for tag in TENSORBOARD_TAGS if tag in tags} == TENSORBOARD_TAGS
    for event in events.Scalars("train/loss"):
        assert event.value == pytest.approx(losses[event.step], rel=1e-6)
    evals = _metrics(run_dir, "eval_loss")
    assert [r["step"] for r in evals] == [EVAL_EVERY, STEPS]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([r["eval_loss"] for r in evals])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the held-out loss falls too
    assert all(0 < e.value < 1 for e in events.Scalars("train/mfu"))
    assert all(e.value > 0.1 for e in events.Scalars("memory/host_rss_gib"))  # CPU: host RSS in GiB
    assert [e.value for e in events.Scalars("checkpoint/saved_step")] == [STEPS]
    hparams = events.PluginTagToContent("hparams")  # the run's settings, in the HPARAMS tab
    assert any(b"lora_rank" in content for content in hparams.values())


def test_config_yaml_is_the_resolved_config(trained_run):
    import yaml

    run_dir, _ = trained_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["max_steps"] == STEPS and saved["output_dir"] == str(run_dir)
    assert saved["context_length"] == 256 and saved["lr"] == 1e-3  # alias recommendations applied


def _load_base(base_dir: Path, dequantized_nf4: bool):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if dequantized_nf4:
        with torch.no_grad():
            for layer in base.model.layers:
                for module in layer.modules():
                    if isinstance(module, torch.nn.Linear):
                        nf4 = quantize_nf4(module.weight.to(torch.bfloat16))
                        module.weight.copy_(nf4.dequantize(torch.float32))
    return base.eval()


def _base_logits(base_dir: Path, ids: dict, dequantized_nf4: bool) -> torch.Tensor:
    with torch.no_grad():
        return _load_base(base_dir, dequantized_nf4)(**ids).logits.float()


def _peft_logits(base_dir: Path, adapter_dir: Path, ids: dict, dequantized_nf4: bool) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(base_dir, dequantized_nf4), adapter_dir).eval()
    with torch.no_grad():
        return model(**ids).logits.float()


def test_peft_loads_the_adapter_with_our_logits(trained_run, tmp_path):
    run_dir, cache = trained_run
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    base_dir = Path(config["base_model_name_or_path"])
    assert base_dir == resolve_model("tiny-llama", str(cache)) and base_dir.is_dir()
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(config["target_modules"]) == 7
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k), "B never trained"

    ids = {"input_ids": torch.randint(4, 600, (2, 24), generator=torch.Generator().manual_seed(0)),
           "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    save_file(ids, str(tmp_path / "ids.safetensors"))
    proc = run_python(str(REPO / "tests/workers/our_logits_worker.py"), str(run_dir),
                      str(tmp_path / "ids.safetensors"), str(tmp_path / "ours.safetensors"),
                      env=subprocess_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = load_file(str(tmp_path / "ours.safetensors"))["logits"]

    # Same NF4 weights, PEFT in fp32: the only difference is our bf16 compute (bf16 activations
    # and bf16-cast adapters, 8-bit mantissa: ~0.4% per rounding, a few roundings per layer).
    on_nf4 = _peft_logits(base_dir, adapter, ids, dequantized_nf4=True)
    scale = on_nf4.abs().max()
    assert (ours - on_nf4).abs().max() < 0.03 * scale
    assert (ours.argmax(-1) == on_nf4.argmax(-1)).float().mean() > 0.95
    # The unquantized base: the logits differ by NF4's own error, whatever the adapter. The
    # tolerance is that error, measured here without the adapter: our logits must be as close
    # to PEFT-on-bf16 as the NF4 base is to the bf16 base, and the adapter's effect on the
    # logits must be the same function on both bases.
    on_bf16 = _peft_logits(base_dir, adapter, ids, dequantized_nf4=False)
    bf16_base = _base_logits(base_dir, ids, dequantized_nf4=False)
    nf4_base = _base_logits(base_dir, ids, dequantized_nf4=True)
    nf4_error = (nf4_base - bf16_base).abs().mean()
    assert (ours - on_bf16).abs().mean() < 1.25 * nf4_error
    adapter_effect_ours, adapter_effect_peft = (ours - nf4_base).flatten(), (on_bf16 - bf16_base).flatten()
    assert torch.corrcoef(torch.stack([adapter_effect_ours, adapter_effect_peft]))[0, 1] > 0.9
