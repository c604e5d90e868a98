"""Eval loss and perplexity over the eval set, token-weighted and summed across ranks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.train.loss import token_loss_sum


@torch.no_grad()
def evaluate(model: nn.Module, eval_batches: Iterable[dict[str, torch.Tensor]], env,
             chunk_tokens: int = 0) -> dict[str, float]:
    """{"eval_loss", "eval_perplexity"}: the mean next-token loss over every labelled eval token.

    Every rank must pass the same number of batches (EvalData pads with label-free rows): under
    FSDP each forward all-gathers the weights. The model is put back in train mode afterwards.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # loss sum, labelled tokens
    try:
        for batch in eval_batches:
            batch = {k: v.to(env.device) for k, v in batch.items()}
            totals[0] += token_loss_sum(model, batch, chunk_tokens).double().cpu()
            totals[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum().cpu()
    finally:
        model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else float("inf")}
