"""Memory options: each CPU-capable one reproduces the plain run's loss trajectory (2 ranks);
GPU-only ones fail fast on CPU; the multi-rank load stays within one NF4 model per node + a shard."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_qlora.model.tiny_llama import generate_llama
from tests.conftest import REPO, run_torchrun, subprocess_env, train_metrics

# Dropout on: checkpointing must replay the same masks in its recomputation.
COMMON = ["--max-steps", "8", "--context-length", "128", "--lora-dropout", "0.1", "--save-every", "0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(run_dir: Path, cache: Path, *extra: str, nproc: int = 2) -> list[dict]:
    return train_metrics(run_dir, cache, *COMMON, *extra, nproc=nproc)


def _trajectory(rows):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def unchunked(tmp_path_factory, cache):
    """The reference: full logits, no checkpointing, no offload."""
    return _train(tmp_path_factory.mktemp("ref") / "run", cache, "--loss-chunk-tokens", "0")


def test_chunked_loss_matches_full_logits(unchunked, tmp_path, cache):
    # 4 x 127 positions per rank in chunks of 100: 6 chunks, the last one partial.
    ours = _train(tmp_path / "run", cache, "--loss-chunk-tokens", "100")
    # Same bf16 logits rows, fp32 cross-entropy terms summed in another order: rounding only
    # (observed <= 2e-7 relative); 1e-5 is far below any real difference (a step moves the loss ~1e-2).
    for ref, got in zip(unchunked, ours, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("flags", [
    ["--activation-checkpointing"],
    ["--activation-checkpointing", "--activation-checkpointing-every", "2", "--activation-offload"],
    ["--activation-checkpointing", "--activation-offload"],
    ["--activation-offload"],
], ids=["checkpoint-all", "checkpoint-every-2+offload", "checkpoint-all+offload", "offload"])
def test_activation_options_reproduce_the_run_exactly(unchunked, tmp_path, cache, flags):
    # Recomputation replays the same ops with the same RNG (dropout) state; offloading copies
    # saved tensors and back: bit-identical losses and gradient norms.
    assert _trajectory(_train(tmp_path / "run", cache, "--loss-chunk-tokens", "0", *flags)) == _trajectory(unchunked)


@pytest.mark.parametrize("checkpointing,offloaded_per_layer", [(True, "boundary"), (False, "everything")])
def test_offload_moves_the_checkpoint_boundaries_or_every_saved_tensor(monkeypatch, checkpointing,
                                                                       offloaded_per_layer):
    """What --activation-offload hands to the host: with checkpointing, exactly one tensor per
    layer (its input, batch x seq x hidden); without, everything the layers save. Gradients are
    those of the plain model, bit for bit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fsdp_qlora.config import TrainConfig
    from fsdp_qlora.model.tiny_llama import TINY_LLAMA_CONFIG
    from fsdp_qlora.train.memory import apply_activation_memory_options

    offloaded = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: (offloaded.append(tuple(tensor.shape)), pack(tensor))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA_CONFIG)
    plain, wrapped = LlamaForCausalLM(config), LlamaForCausalLM(config)
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_memory_options(wrapped.model.layers, TrainConfig(
        activation_checkpointing=checkpointing, activation_offload=True))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    grads = []
    for model in (plain, wrapped):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    layers, boundary = config.num_hidden_layers, (2, 16, config.hidden_size)
    if offloaded_per_layer == "boundary":
        assert offloaded == [boundary] * layers
    else:
        assert len(offloaded) > 10 * layers
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("flags,needle", [
    (["--cpu-offload"], "--cpu-offload needs a CUDA device"),
    (["--optimizer", "paged_adamw8bit"], "--optimizer paged_adamw8bit needs a CUDA device"),
    (["--optimizer", "paged_adamw"], "--optimizer paged_adamw needs a CUDA device"),
])
def test_gpu_only_options_fail_fast_on_cpu(tmp_path, cache, flags, needle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: these options run")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--output-dir", str(tmp_path / "run"), *COMMON,
                           *flags], cwd=REPO, env=subprocess_env(cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.gpu
def test_cpu_offload_trains_on_gpu(tmp_path, cache):
    rows = _train(tmp_path / "run", cache, "--cpu-offload", "--activation-checkpointing", nproc=1)
    assert len(rows) == 8 and all(r["loss"] == r["loss"] for r in rows)


# ---- multi-rank low-memory load ------------------------------------------------------------------
BIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
       "num_attention_heads": 16, "num_key_value_heads": 8}
MARGIN_PER_RANK = 128 * 2**20  # as tests/test_loader_memory.py: slice in flight, quantization temporaries, heap slack


def test_two_rank_load_holds_one_nf4_model_plus_a_shard(tmp_path):
    model = generate_llama(tmp_path / "big", BIG, num_shards=4)
    shards = sorted(model.glob("*.safetensors"))
    bf16_bytes = sum(p.stat().st_size for p in shards)
    run_torchrun(REPO / "tests/workers/load_memory_worker.py", 2, str(model), str(tmp_path / "mem"), timeout=300)
    ranks = [json.loads((tmp_path / f"mem.rank{r}").read_text()) for r in range(2)]
    one_nf4_model = sum(r["held"] for r in ranks)  # the ranks' shards together: the model once
    bound = one_nf4_model + max(p.stat().st_size for p in shards) + 2 * MARGIN_PER_RANK
    assert bound < 2 * bf16_bytes  # an N-fold (every rank reads the full bf16 model) load would fail
    assert sum(r["peak_growth"] for r in ranks) < bound, (ranks, bound)
