"""Evaluation (token-weighted loss and perplexity) and the data errors as train.py reports them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.pipeline import EvalData, build_train_data
from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.model.tiny_llama import ensure_tiny_llama
from fsdp_qlora.train.evaluate import evaluate
from fsdp_qlora.train.loss import token_loss_sum
from tests.conftest import REPO, run_python, subprocess_env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    ensure_tiny_llama(path)
    return path


def test_eval_loss_is_token_weighted_and_ranks_run_equal_batches(cache):
    model_dir = ensure_tiny_llama(cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    cfg = TrainConfig(context_length=256, batch_size=4, eval_fraction=0.05).validate()
    rows = build_train_data(cfg, tokenizer).eval.rows  # 20 examples
    env = SimpleNamespace(device=torch.device("cpu"))
    result = evaluate(model, EvalData(rows, 3, 0, 1, tokenizer.pad_token_id).batches(), env)
    assert model.training  # put back in train mode
    with torch.no_grad():  # reference: example by example
        losses = [(token_loss_sum(model, b).item(), int((b["labels"][:, 1:] != IGNORE_INDEX).sum()))
                  for b in EvalData(rows, 1, 0, 1, tokenizer.pad_token_id).batches()]
    expected = sum(loss for loss, _ in losses) / sum(n for _, n in losses)
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # 3 ranks over 20 rows: 7 rows each, the short rank padded with label-free filler
    shards = [EvalData(rows.select(range(20)), 2, rank, 3, tokenizer.pad_token_id) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    labelled = [sum(int((b["labels"] != IGNORE_INDEX).any(1).sum()) for b in s.batches()) for s in shards]
    assert labelled == [7, 7, 6]


def test_eval_metrics_appear_at_the_chosen_interval(cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(str(REPO / "train.py"), "--max-steps", "5", "--eval-every", "2", "--eval-fraction", "0.05",
                      "--packing", "--batch-size", "2", "--save-every", "0", "--output-dir", str(run_dir),
                      env=subprocess_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packing efficiency" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps and at the end
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 5]
    assert events.Scalars("data/efficiency")[0].value > 0.9


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_missing_columns_exit_2_with_one_line(cache, tmp_path):
    """The real CLI: one error line on stderr, exit code 2, before any weights load."""
    path = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": "hi", "completion": "hello"}])
    proc = run_python(str(REPO / "train.py"), "--dataset", path, "--output-dir", str(tmp_path / "run"),
                      env=subprocess_env(cache))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert ("lacks column(s) instruction, output (instruction), messages (chat) or text (text); it has prompt, "
            "completion: map yours with --instruction-column") in errors[0]
    assert "Loading weights" not in proc.stderr


@pytest.mark.parametrize("rows, flags, message", [
    ([{"instruction": "Say hi.", "output": "hi"}], ["--context-length", "4", "--truncation", "drop"],
     "is empty after filtering: 1 examples, 1 longer than --context-length 4 (dropped by --truncation drop)"),
    ([{"instruction": "Say hi.", "output": "hi"}], ["--context-length", "4"],
     "is empty after filtering: 1 examples, 1 longer than --context-length 4, 1 with no token to learn"),
    ([{"text": "a b"}], ["--dataset-format", "chat"], "lacks column(s) messages for --dataset-format chat; it has "
     "text: name yours with --messages-column"),
    ([{"text": "a b"}], ["--eval-every", "5"], "--eval-every 5 needs an eval set: pass --eval-split or --eval-fraction"),
    ([{"text": "a b"}], ["--eval-split", "test"], "a local file has one split, 'train', not 'test'"),
])
def test_data_errors_are_one_line_exit_2(cache, tmp_path, monkeypatch, capsys, rows, flags, message):
    """train.py's main() in this process (a world of one), as the CLI runs it."""
    import train

    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    monkeypatch.setattr("sys.argv", ["train.py", "--dataset", path, "--output-dir", str(tmp_path / "run"),
                                     "--model-cache-dir", str(cache), *flags])
    assert train.main() == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert len(errors) == 1 and errors[0].startswith("train.py: error:") and message in errors[0], errors
