"""The training recipe: config -> sharded QLoRA model -> steps -> PEFT adapter. Reads top to bottom."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from fsdp_qlora.config import ConfigError, TrainConfig
from fsdp_qlora.data.sft import IGNORE_INDEX, build_dataloader, load_instruction_dataset
from fsdp_qlora.distributed.env import DistEnv, broadcast_object, init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.metrics.logger import MetricsLogger
from fsdp_qlora.model.loader import build_qlora_model
from fsdp_qlora.model.sources import resolve_model
from fsdp_qlora.peft.export import adapter_state_dict, save_peft_adapter
from fsdp_qlora.train.optim import build_optimizer, build_scheduler


def train(cfg: TrainConfig) -> Path:
    """Run one training job; returns the run directory. Every rank calls this."""
    model_dir = resolve_model(cfg.model, cfg.model_cache_dir)  # validates before any weight loads
    env = init_distributed()
    try:
        run_dir = _prepare_run_dir(cfg, env)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dataset = load_instruction_dataset(cfg.dataset)
        mesh = build_mesh(env)
        model = build_qlora_model(model_dir, cfg, env, mesh)
        _train_loop(model, tokenizer, dataset, cfg, env, run_dir)
        _export_adapter(model, cfg, env, model_dir, run_dir / "adapter")
        return run_dir
    finally:
        shutdown()


def _prepare_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """Choose the run directory on rank 0 (the default is time-stamped) and save config.yaml."""
    if not cfg.output_dir:
        name = Path(cfg.model).name or "model"
        cfg.output_dir = str(Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg.output_dir = broadcast_object(cfg.output_dir)
    run_dir = Path(cfg.output_dir)
    if (run_dir / "adapter").exists():
        raise ConfigError(f"{run_dir} already holds a finished run (adapter/): choose another --output-dir")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(run_dir / "config.yaml")
    dist.barrier()
    return run_dir


def _micro_batches(dataset, tokenizer, cfg: TrainConfig, env: DistEnv):
    """Endless stream of this rank's micro-batches, reshuffled (seeded) every epoch."""
    epoch = 0
    while True:
        loader = build_dataloader(dataset, tokenizer, cfg.context_length, cfg.batch_size,
                                  env.rank, env.world_size, cfg.seed, epoch=epoch)
        yield from loader
        epoch += 1


def _steps_per_epoch(dataset, tokenizer, cfg: TrainConfig, env: DistEnv) -> int:
    loader = build_dataloader(dataset, tokenizer, cfg.context_length, cfg.batch_size,
                              env.rank, env.world_size, cfg.seed, epoch=0)
    steps = len(loader) // cfg.grad_accum_steps
    if steps == 0:
        raise ConfigError(f"the dataset gives {len(loader)} micro-batches per rank, fewer than "
                          f"--grad-accum-steps {cfg.grad_accum_steps}: lower --batch-size or --grad-accum-steps")
    return steps


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions (fp32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted_logits = logits[:, :-1].float()
    shifted_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value


def _train_loop(model, tokenizer, dataset, cfg: TrainConfig, env: DistEnv, run_dir: Path) -> None:
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * _steps_per_epoch(dataset, tokenizer, cfg, env)
    optimizer = build_optimizer(adapter_params, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    metrics = MetricsLogger(run_dir, enabled=env.is_main)
    batches = _micro_batches(dataset, tokenizer, cfg, env)
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank, repeatably
    model.train()
    for step in range(1, total_steps + 1):
        started = time.perf_counter()
        micro = [{k: v.to(env.device) for k, v in next(batches).items()} for _ in range(cfg.grad_accum_steps)]
        # Normalize by the labelled tokens of the whole global batch, so the gradient is that
        # of the mean token loss however the tokens fall across ranks and micro-steps.
        # FSDP averages gradients over ranks, hence the world_size factor.
        local_counts = torch.stack([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro]).sum()
        global_label_tokens = _all_reduce_sum(local_counts.float().cpu()).item()
        loss_sum = torch.zeros((), device=env.device)
        for i, batch in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = token_loss_sum(model, batch)
            (loss * env.world_size / global_label_tokens).backward()
            loss_sum += loss.detach()
        grad_norm = _clip_grad_norm(adapter_params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = _all_reduce_sum(loss_sum.cpu()).item() / global_label_tokens
        input_tokens = _all_reduce_sum(torch.stack([b["attention_mask"].sum() for b in micro]).sum().cpu()).item()
        elapsed = time.perf_counter() - started
        if step % cfg.log_every == 0 or step == total_steps:
            scalars = {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_sec": input_tokens / elapsed}
            metrics.log(step, scalars)
            if env.is_main:
                print(f"step {step}/{total_steps} loss {step_loss:.4f} lr {scalars['lr']:.2e} "
                      f"grad_norm {grad_norm:.3f} tokens/s {scalars['tokens_per_sec']:.0f}", flush=True)
    metrics.close()


def _clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the (sharded) gradients; clips when max_norm > 0."""
    clip_to = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip_to, foreach=False)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _export_adapter(model: nn.Module, cfg: TrainConfig, env: DistEnv, model_dir: Path, out_dir: Path) -> None:
    # full_tensor() all-gathers each adapter tensor: every rank joins, rank 0 writes.
    full = {name: p.full_tensor().cpu() for name, p in model.named_parameters() if p.requires_grad}
    if env.is_main:
        save_peft_adapter(out_dir, adapter_state_dict(full), base_model_name_or_path=str(model_dir.resolve()),
                          r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=sorted(set(cfg.lora_target_modules)))
