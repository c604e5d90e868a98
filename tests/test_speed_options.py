"""The speed options train what the plain run trains: 2-rank loss trajectories against the plain run.

Speed itself is measured by tools/bench_throughput.py (docs/benchmarks.md), never here.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_python, run_torchrun, subprocess_env, train_metrics

FLAGS = ["--max-steps", "5", "--batch-size", "2", "--context-length", "64", "--save-every", "0", "--lora-dropout", "0"]


def _losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows if "loss" in row]


# The plainest schedule: a unit per layer, each NF4 weight dequantized in forward and again in backward.
PLAIN = ["--fsdp-units", "layer", "--no-dequantize-once"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[float]:
    root = tmp_path_factory.mktemp("plain")
    return _losses(train_metrics(root / "run", root / "cache", *FLAGS, *PLAIN))


@pytest.mark.parametrize("option", [["--fsdp-units", "model", "--no-dequantize-once"],
                                    ["--fsdp-units", "layer", "--dequantize-once"],
                                    ["--fsdp-units", "model", "--sharding", "ddp"],
                                    []])  # the defaults: auto, which the planner resolves to the model unit + once here
def test_scheduling_options_train_bit_for_bit_the_same(plain, option, tmp_path):
    """FSDP units change when parameters are gathered and gradients reduced;
    --dequantize-once reuses forward's dequantized weight in backward, the same bytes dequantized
    by the same kernel. Neither changes what is computed: the same losses, exactly."""
    assert _losses(train_metrics(tmp_path / "run", tmp_path / "cache", *FLAGS, *option)) == plain


def test_ddp_accumulates_gradients_like_fsdp(tmp_path):
    """With --grad-accum-steps, only the last micro-batch's backward reduces (distributed/replicate.py:
    the others accumulate locally, in fp32, as FSDP2 does without gradient sync): the same losses as
    --sharding fsdp, exactly, and the same gradient norms up to float64 summation order (fsdp sums the
    squares of the reduced buffer, ddp per tensor: ~1e-15 relative)."""
    accumulate = [*FLAGS, "--batch-size", "1", "--grad-accum-steps", "2"]
    runs = {sharding: train_metrics(tmp_path / sharding, tmp_path / "cache", *accumulate, "--sharding", sharding)
            for sharding in ("fsdp", "ddp")}
    losses = {sharding: [r["loss"] for r in metrics if "loss" in r] for sharding, metrics in runs.items()}
    assert len(losses["ddp"]) == 5 and losses["ddp"] == losses["fsdp"]
    norms = {sharding: [r["grad_norm"] for r in metrics if "loss" in r] for sharding, metrics in runs.items()}
    assert norms["ddp"] == pytest.approx(norms["fsdp"], rel=1e-12)


def test_compile_follows_the_eager_trajectory(plain, tmp_path):
    """--compile: inductor fuses each layer's elementwise work and keeps the fused bf16 intermediates in
    fp32 where eager rounds every op's result to bf16, and the NF4 matmuls run through the registered
    dequantization op (model/nf4.py). The same computation up to bf16 rounding: measured at most
    0.03% over these 5 steps (losses ~7); bound 0.5%, the compute-dtype tests' bound for bf16 rounding.
    The graph must not break at the NF4 weights (the run would still train, more slowly): the log
    counts dynamo's graph breaks, which must be none."""
    env = {**subprocess_env(tmp_path / "cache"), "TORCH_LOGS": "graph_breaks"}
    proc = run_torchrun(REPO / "train.py", 2, "--output-dir", str(tmp_path / "run"), *FLAGS, *PLAIN, "--compile",
                        env=env, timeout=900)
    assert "Graph break" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = _losses(rows)
    assert len(ours) == len(plain) and ours != plain  # compiled, hence rounded differently
    assert all(abs(a - b) <= 5e-3 * abs(b) for a, b in zip(ours, plain)), (ours, plain)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_other_compute_dtypes_follow_the_bf16_trajectory(plain, dtype, tmp_path):
    """Same NF4 bytes, adapters and data; only the rounding of the matmuls and activations differs.
    bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per operation), fp16 11 and fp32 24,
    so fp32 and fp16 losses differ from bf16's by bf16 rounding accumulated over the layers: measured
    at most 0.10% over 5 steps (tiny Llama); bound 0.5%. And fp16 (with loss scaling) must be much
    closer to fp32 than bf16 is: measured 0.002%, bound 0.05%."""
    ours = _losses(train_metrics(tmp_path / "run", tmp_path / "cache", *FLAGS, "--compute-dtype", dtype))
    assert len(ours) == len(plain)
    assert all(abs(a - b) <= 5e-3 * abs(b) for a, b in zip(ours, plain)), (ours, plain)
    if dtype == "fp16":
        fp32 = _losses(train_metrics(tmp_path / "fp32", tmp_path / "cache", *FLAGS, "--compute-dtype", "fp32"))
        assert all(abs(a - b) <= 5e-4 * abs(b) for a, b in zip(ours, fp32)), (ours, fp32)


def test_fp16_overflow_is_skipped_and_lowers_the_loss_scale(tmp_path):
    """A non-finite step under fp16 is an overflow first: skipped, the scale halved, not counted
    towards --max-bad-steps (here 1, which a bf16 run would abort on)."""
    env = {**subprocess_env(tmp_path / "cache"), "FSDP_QLORA_FAULTS": "nan_loss_at=2"}
    proc = run_torchrun(REPO / "train.py", 2, "--output-dir", str(tmp_path / "run"), *FLAGS, "--compute-dtype", "fp16",
                        "--max-bad-steps", "1", env=env, timeout=300)
    assert "fp16 overflow at step 2: update skipped, loss scale now 32768" in proc.stdout, proc.stdout[-2000:]
    assert "done: adapter in" in proc.stdout


def test_compute_dtype_auto_follows_the_hardware():
    import torch

    from fsdp_qlora.train.precision import native_bf16, resolve_compute_dtype

    cpu = torch.device("cpu")
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert native_bf16(cpu) == (expected == torch.bfloat16)
    assert resolve_compute_dtype("auto", cpu) == expected
    assert resolve_compute_dtype("fp16", cpu) == torch.float16


def test_bad_speed_options_are_one_line(tmp_path):
    proc = run_python(str(REPO / "train.py"), "--compute-dtype", "fp8", "--output-dir", str(tmp_path / "run"),
                      env=subprocess_env(tmp_path / "cache"), timeout=120)
    assert proc.returncode == 2 and "--compute-dtype" in proc.stderr and "fp8" in proc.stderr, proc.stderr
