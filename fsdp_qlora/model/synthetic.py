"""Synthetic base weights (``--synthetic-weights``): any architecture from its config alone, no checkpoint.

What it is for: the real memory and speed of a configuration on your hardware (a 70B on your GPUs)
before downloading 140 GB, and the GPU checks (tools/gpu_check.py). The weights are random, so the
loss means nothing; everything else (shapes, NF4 bytes, sharding, activations, steps) is a real run's.

Two halves: the stand-in checkpoint directory (``config.json`` and a tokenizer, no weights:
model/synthetic_dir.py) and the weights, here:

`fill_synthetic_weights` replaces `load_base_weights`: every frozen parameter gets this rank's rows,
  norm weights 1 (a 1-D ``weight``) and everything else (linears, experts, embeddings, lm_head, routers,
  biases) a normal of std ``initializer_range`` (transformers' init scale; 0.02 by default). The rows are
  drawn on the device in blocks whose seeds depend on the seed, the tensor's checkpoint name and the
  block's index, never on the world size, and are then quantized exactly as the loader quantizes rows
  it read. So a rank draws only the rows it owns, and its NF4 bytes equal those of the same rows in a
  1-process build: the project's rule, the same bytes at every world size (tests/test_synthetic.py).
  Norm weights of 1 are the identity for ``w * x`` norms; Gemma's ``(1 + w) * x`` norms then scale by 2.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from fsdp_qlora.model.experts import expert_shapes
from fsdp_qlora.model.loader import (
    STORAGE_DTYPE,
    check_all_loaded,
    checkpoint_key_to_param,
    install_local,
    install_local_rows,
    param_rows,
    tie_missing,
    tied_keys,
)
from fsdp_qlora.model.nf4_experts import empty_nf4_experts, set_expert
from fsdp_qlora.model.quantized_linear import NF4Linear

# Values per seeded draw: a whole number of rows of at least this many values is one block (one
# generator), so the blocks, hence the values, depend on the tensor's shape alone. 4 Mi fp32 values
# (16 MiB) per draw keep the launches few on a GPU and the temporary small.
BLOCK_VALUES = 1 << 22
DEFAULT_STD = 0.02  # transformers' initializer_range when a config does not set it


# ---- the weights ---------------------------------------------------------------------------------
def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def synthetic_rows(name: str, rows: int, cols: int, start: int, stop: int, seed: int, std: float,
                   device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of the seeded normal (rows, cols) matrix named `name`, in bf16 on `device`.

    The matrix is drawn in blocks of whole rows (at least `BLOCK_VALUES` values each), each from its
    own generator seeded by (seed, name, block index); only the blocks overlapping [start, stop) are
    drawn. The same rows thus have the same values whichever range asks for them (on one device
    type: CPU and CUDA generators differ)."""
    per_block = max(1, BLOCK_VALUES // cols)
    parts = []
    for block in range(start // per_block, math.ceil(stop / per_block)):
        first, last = block * per_block, min(rows, (block + 1) * per_block)
        generator = torch.Generator(device=device).manual_seed(_block_seed(seed, name, block))
        values = torch.randn(last - first, cols, generator=generator, device=device)
        parts.append(values[max(start, first) - first: min(stop, last) - first].mul_(std).to(STORAGE_DTYPE))
    return torch.cat(parts) if parts else torch.empty(0, cols, dtype=STORAGE_DTYPE, device=device)


def fill_synthetic_weights(model: nn.Module, device: torch.device, seed: int,
                           compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Give an FSDP2-sharded model (quantized on meta, as `load_base_weights` expects it) this rank's
    rows of synthetic weights, by checkpoint name, instead of reading a checkpoint."""
    targets = checkpoint_key_to_param(model)
    tied = tied_keys(model, targets, set())  # a tied lm_head is the embedding: tied after, as a load does
    std = float(getattr(getattr(model, "config", None), "initializer_range", None) or DEFAULT_STD)
    for key in sorted(set(targets) - tied):
        holders = targets[key]
        module, attr = holders[0]
        if attr in expert_shapes(module):
            _fill_experts(key, holders, device, seed, std, compute_dtype)
        else:
            _fill_rows(key, holders, device, seed, std, compute_dtype)
    tie_missing(model, targets, set())
    check_all_loaded(model)


def _fill_rows(key: str, holders: list[tuple[nn.Module, str]], device: torch.device, seed: int, std: float,
               compute_dtype: torch.dtype) -> None:
    module, attr = holders[0]
    param = getattr(module, attr)
    nf4 = isinstance(module, NF4Linear) and attr == "weight"  # stored packed: draw the logical weight
    shape = (module.out_features, module.in_features) if nf4 else tuple(param.shape)
    start, stop = param_rows(param, shape[0])
    if attr == "weight" and len(shape) == 1:  # a norm's scale: the identity
        rows = torch.ones(stop - start, dtype=STORAGE_DTYPE, device=device)
    else:
        cols = math.prod(shape[1:])
        rows = synthetic_rows(key, shape[0], cols, start, stop, seed, std, device).reshape(-1, *shape[1:])
    for holder_module, holder_attr in holders:
        install_local_rows(holder_module, holder_attr, start, rows, device, compute_dtype)


def _fill_experts(key: str, holders: list[tuple[nn.Module, str]], device: torch.device, seed: int, std: float,
                  compute_dtype: torch.dtype) -> None:
    """This rank's whole experts of a fused (experts, a, b) weight: expert e is rows e*a.. of the
    (experts * a, b) matrix `key`, quantized on its own as the loader does (model/nf4_experts.py)."""
    module, attr = holders[0]
    param = getattr(module, attr)
    experts, a, b = expert_shapes(module)[attr]
    start, stop = param_rows(param, experts)
    quantized = param.dtype == torch.uint8
    local = (empty_nf4_experts(stop - start, a, b, device, compute_dtype) if quantized
             else torch.empty(stop - start, a, b, dtype=param.dtype, device=device))
    for expert in range(start, stop):
        weight = synthetic_rows(key, experts * a, b, expert * a, (expert + 1) * a, seed, std, device)
        if quantized:
            set_expert(local, expert - start, weight)
        else:
            local[expert - start].copy_(weight)
    install_local(holders, local)
