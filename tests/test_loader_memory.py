"""Streaming load + first training step: loading grows host memory by the loaded NF4 model plus about
one shard, never the bf16 model, and by the same amount on every run; the first step stays near that."""

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
MAX_SPREAD = 64 * 2**20  # of the load's growth; measured: 19 MB over 8 runs; with the earlier guard 67-149 MB over 3-5
# The first step on top of the load, with freed blocks reused from the heap as train.py does on CPU:
# 469-560 MB of growth over 10 runs against a bound of 515 MB (2026-12-05), and one run of about
# seven failed this test with 128 MB here. The bf16 model would still exceed bound + allowance.
STEP_ALLOWANCE = 256 * 2**20


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
    load_mb = [round(r["load_peak_growth"] / 2**20) for r in runs]
    assert max(r["load_peak_growth"] for r in runs) < bound, (load_mb, f"bound {bound / 2**20:.0f} MB")
    assert max(r["load_peak_growth"] for r in runs) - min(r["load_peak_growth"] for r in runs) < MAX_SPREAD, load_mb
    # The step reuses freed heap (CPU training: host_memory.reuse_freed_memory), so what it adds
    # depends on how its allocations interleave; it still never holds the bf16 model.
    growth_mb = [round(r["peak_growth"] / 2**20) for r in runs]
    assert max(r["peak_growth"] for r in runs) < bound + STEP_ALLOWANCE, (growth_mb, f"bound {bound / 2**20:.0f} MB")
    assert bound + STEP_ALLOWANCE < held + bf16_bytes


# Mixtral-shaped (8 experts, top-2), ~1 GB of bf16 of which ~97% are experts, saved by transformers'
# class in the hub layout (one 2-D tensor per expert and projection) in ~300 MB shards.
MOE_MODEL = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 5, "num_attention_heads": 8,
             "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1024}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("moe-model") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **MOE_MODEL), dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="300MB")
    return out


def test_moe_load_holds_nf4_experts_plus_one_shard_never_the_bf16_experts(moe_model, tmp_path):
    """The experts are read one expert at a time (each rank only its own) and quantized as they arrive,
    so growth stays under the NF4 model + the largest shard + `MARGIN` (the same allowance as the
    dense load: read-ahead window, bitsandbytes' fp32 working copies of one expert's weight). Holding
    the experts in bf16 even briefly, as transformers + bitsandbytes do (bitsandbytes #1849), would
    exceed it."""
    shards = sorted(moe_model.glob("*.safetensors"))
    bf16_bytes = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 3 and bf16_bytes > 900 * 2**20
    result = tmp_path / "mem"
    proc = run_python(str(REPO / "tests/workers/load_memory_worker.py"), str(moe_model), str(result), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(result.with_name(f"{result.name}.rank0").read_text())
    held = figures["held"]
    bound = held + max(p.stat().st_size for p in shards) + MARGIN
    assert held < 0.3 * bf16_bytes  # the experts really are NF4
    assert bound < held + bf16_bytes  # the test can tell a streaming load from a full one
    assert figures["peak_growth"] < bound, (figures["peak_growth"] / 2**20, f"bound {bound / 2**20:.0f} MB")


FAULTS_SCRIPT = """
import json, resource, sys
import torch
from fsdp_qlora.model import host_memory

def faults_per_block(blocks=20, nbytes=4 << 20):
    for _ in range(blocks):  # warm-up: the heap grows over the first few blocks, then is reused
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(blocks):
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)  # a step's transient: allocated, written, freed
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / blocks

host_memory.serve_large_allocations_by_mmap()  # the load's rule
loading = faults_per_block()
reused = host_memory.reuse_freed_memory(torch.device("cpu"))  # what train.py does after the load on CPU
print(json.dumps({"loading": loading, "reused": reused, "training": faults_per_block()}))
"""


def test_cpu_training_reuses_the_blocks_that_loading_returns_to_the_os():
    """Under the load's rule a freed 4 MiB block comes back as fresh pages (~1,000 faults each time);
    after `reuse_freed_memory`, as in train.py's CPU steps, the heap grows over the first few blocks
    and then serves them without a fault."""
    proc = run_python("-c", FAULTS_SCRIPT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults = json.loads(proc.stdout.strip().splitlines()[-1])
    assert faults["reused"] is True
    assert faults["loading"] > 500, faults  # 4 MiB = 1,024 pages of 4 KiB
    assert faults["training"] < 10, faults
