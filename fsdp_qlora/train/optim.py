"""Optimizer and learning-rate schedule for the adapter parameters."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from fsdp_qlora.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    # foreach=False: the params are DTensors whose local shards may differ in shape per rank;
    # the per-tensor path is the one FSDP2 documents as always safe.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), foreach=False)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Linear warmup from ~0 to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
