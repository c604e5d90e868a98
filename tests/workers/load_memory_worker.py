"""Peak host-memory growth of loading a model (run in its own process; see test_loader_memory).

argv: <model dir> <result json> [--step [steps]]. With --step, one (or `steps`) short training
step(s) follow the load as train.py runs them (batch 1 x 64 tokens, the project's loss and
optimizer), and `peak_growth` covers load and steps; `load_peak_growth` is the load alone.
Under torchrun each rank reports its own figures.
"""

import json
import sys
import time
from pathlib import Path

import psutil
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (import cost is not load cost)

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.metrics.system import peak_rss, reset_peak_rss
from fsdp_qlora.model.host_memory import reuse_freed_memory
from fsdp_qlora.model.loader import local_weight_bytes
from fsdp_qlora.peft.apply import adapter_param_groups
from fsdp_qlora.train.build import build_qlora_model
from fsdp_qlora.train.loss import token_loss_sum
from fsdp_qlora.train.optim import build_optimizer

STEP_TOKENS = 64  # short: this CPU has no native bf16 (a bf16 matmul is ~60x slower than fp32)


def train_steps(model, cfg: TrainConfig, steps: int) -> list[float]:
    """`steps` optimizer steps on one random sequence; their wall times."""
    optimizer = build_optimizer(adapter_param_groups(model, cfg.loraplus_lr_ratio, cfg.lr), cfg)
    ids = torch.randint(0, model.config.vocab_size, (1, STEP_TOKENS), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        token_loss_sum(model, batch, cfg.loss_chunk_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    model_dir, result = Path(sys.argv[1]), Path(sys.argv[2])
    steps = 0
    if len(sys.argv) > 3 and sys.argv[3] == "--step":
        steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    env = init_distributed()
    mesh = build_mesh(env)
    # Dequantizing twice: the step's transients are one dequantized weight at a time, as the bound
    # assumes (--dequantize-once keeps every layer's, a speed option the planner weighs on its own).
    cfg = TrainConfig(model=str(model_dir), dequantize_once=False)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    model = build_qlora_model(model_dir, cfg, env, mesh)
    figures = {"baseline": baseline, "held": local_weight_bytes(model), "load_s": time.perf_counter() - started,
               "load_peak_growth": peak_rss() - baseline,
               "rss_growth_after_load": psutil.Process().memory_info().rss - baseline}
    if steps:
        reuse_freed_memory(env.device)  # as train.py does after the load
        figures["step_s"] = train_steps(model, cfg, steps)
        figures["rss_growth_after_steps"] = psutil.Process().memory_info().rss - baseline
    figures["peak_growth"] = peak_rss() - baseline
    Path(f"{result}.rank{env.rank}").write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main()
