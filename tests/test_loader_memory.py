"""Streaming load + first training step: host memory grows by the loaded NF4 model plus about one
shard, never the bf16 model, and by the same amount on every run."""

import json

import pytest

from fsdp_qlora.model.tiny_llama import generate_llama
from tests.conftest import REPO, run_python

# The layer shapes (hidden 2048, MLP 5632, 16/8 heads) with 8 layers instead of 12, to keep
# five runs near 100 s: ~730 MB of bf16 in 4 shards of ~182 MB; NF4 shrinks the decoder linears
# to ~27%. Large enough for the first step's dequantized weights (up to 23 MB each) to show the
# effect: with the earlier guard (glibc's 32 MiB mmap threshold restored after the load) the
# step's retained heap took peak growth to 621-688 MB, above the bound (515 MB).
MODEL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 8}
RUNS = 5  # fresh processes, one after another: the bound must hold on every run, not on average
# Allowed on top of the held weights and the largest shard (which the streaming loader never holds
# whole; it stands for the one slice in flight and its quantization): the read-ahead window
# (<= 64 MiB), bitsandbytes' fp32 working copies of the slice being quantized (~4x the slice),
# the small quantization constants' heap and the library pages first touched. Measured on this
# model: 447-466 MB of growth (held 203 MB) over 8 runs, all of it during the load; the step's
# own peak is lower (host_memory.py keeps its multi-MB transients off the heap).
# Materializing the bf16 model would exceed the bound (asserted below).
MARGIN = 128 * 2**20
MAX_SPREAD = 64 * 2**20  # measured: 19 MB over 8 runs; with the earlier guard 67-149 MB over 3-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return generate_llama(tmp_path_factory.mktemp("model") / "model", MODEL, num_shards=4)


def test_load_and_first_step_stay_within_nf4_plus_one_shard_on_every_run(model, tmp_path):
    shards = sorted(model.glob("*.safetensors"))
    bf16_bytes = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 4 and bf16_bytes > 600 * 2**20
    runs = []
    for run in range(RUNS):
        result = tmp_path / f"mem{run}"
        proc = run_python(str(REPO / "tests/workers/load_memory_worker.py"), str(model), str(result), "--step",
                          timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(result.with_name(f"{result.name}.rank0").read_text()))
    held = runs[0]["held"]
    bound = held + max(p.stat().st_size for p in shards) + MARGIN
    assert all(r["held"] == held and len(r["step_s"]) == 1 for r in runs)
    assert held < 0.4 * bf16_bytes  # it really is NF4 (+ bf16 embeddings/head, fp32 adapters)
    assert bound < held + bf16_bytes  # the test can tell a streaming load from a full one
    growth_mb = [round(r["peak_growth"] / 2**20) for r in runs]
    assert max(r["peak_growth"] for r in runs) < bound, (growth_mb, f"bound {bound / 2**20:.0f} MB")
    assert max(r["peak_growth"] for r in runs) - min(r["peak_growth"] for r in runs) < MAX_SPREAD, growth_mb
