"""tools/bench_throughput.py: its bookkeeping (no timing here: speed is measured by the tool itself)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "tools" / "bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**overrides):
    values = dict(nproc=2, batch_size=4, steps=10, warmup=2, model="tiny-llama", context_length=256)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_reads_ours_after_warmup(bench, tmp_path):
    rows = [{"step": s, "loss": 10.0 - s, "tokens_per_sec": 100.0 * s} for s in range(1, 6)]
    rows.insert(2, {"step": 2, "checkpoint/saved_step": 2})  # rows without tokens/s are ignored
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = bench.read_ours_metrics(path, warmup=2)
    assert result["tokens_per_sec"] == [300.0, 400.0, 500.0]
    assert (result["first_loss"], result["last_loss"]) == (9.0, 5.0)
    assert bench.summarize(result["tokens_per_sec"])["median"] == 400.0


def test_summarize_needs_steps(bench):
    with pytest.raises(ValueError, match="warmup"):
        bench.summarize([])


def test_ratio_is_ours_over_peer_per_repeat(bench):
    def run(median):
        return {"summary": {"median": median, "p25": median, "p75": median, "steps": 3},
                "first_loss": 1.0, "last_loss": 0.5}

    repeats = [{"ours": run(100.0), "bf16-ddp": run(200.0), "nf4": {"skipped": "no 4-bit on CPU"}},
               {"ours": run(300.0), "bf16-ddp": run(200.0), "nf4": {"skipped": "no 4-bit on CPU"}}]
    combined = bench.combine(repeats, ["ours"])
    assert combined["ours"]["median"] == 200.0
    assert combined["bf16-ddp"]["ratios"]["ours"]["per_repeat"] == [0.5, 1.5]
    assert combined["bf16-ddp"]["ratios"]["ours"]["median"] == 1.0
    assert combined["nf4"] == {"skipped": "no 4-bit on CPU"}
    table = bench.format_table(combined, repeats, _args(), ["ours"])
    assert "| 1.00 |" in table and "skipped: no 4-bit on CPU" in table


def test_ours_command_matches_the_documented_one(bench):
    cmd = bench.ours_command(_args(steps=30), "<tmp>", bench.OURS["ours"][0])
    assert " ".join(cmd) == ("torchrun --standalone --nproc_per_node 2 train.py --model tiny-llama --max-steps 30 "
                             "--batch-size 4 --context-length 256 --output-dir <tmp> --log-every 1 --lora-dropout 0 --sharding fsdp")
    assert bench.ours_command(_args(), "x", bench.OURS["ours-ddp"][0])[-2:] == ["--sharding", "ddp"]


def test_rejects_unknown_peers(bench):
    with pytest.raises(SystemExit):
        bench.main(["--peers", "bf16,deepspeed"])


def test_profile_step_reports_the_window_and_writes_a_trace(tmp_path):
    """tools/profile_step.py runs train.py unchanged and profiles the chosen steps (no timing checked)."""
    from tests.conftest import run_python, subprocess_env

    run = tmp_path / "run"
    proc = run_python(str(REPO / "tools" / "profile_step.py"), "--steps", "2:3", "--rows", "5", "--",
                      "--max-steps", "3", "--batch-size", "2", "--context-length", "64", "--output-dir", str(run),
                      "--save-every", "0", env=subprocess_env(tmp_path / "cache"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profile of 2 steps (rank 0)" in proc.stdout and "train_step" in proc.stdout
    assert json.loads((run / "profile-rank0.json").read_text())["traceEvents"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # the run itself finished as usual
