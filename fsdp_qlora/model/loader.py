"""Quantize a meta-device model's decoder linears to NF4, then stream its (sharded) weights in.

The model is assembled by train/build.py (structure, adapters, memory options, sharding); this
module only swaps linears for `NF4Linear`, rebuilds computed buffers and loads weights. No rank
ever materializes the full bf16 model. For every tensor a rank reads only the rows of
dim 0 it will own under FSDP2 (one contiguous byte range of the file, read by parallel positioned
reads: model/shard_reader.py), quantizes them when the layer is NF4, and installs them as its
local shard, while the next slices are being read. Peak host memory is therefore about the
rank's own part plus the read-ahead window (`READ_AHEAD_BYTES`, or one slice when larger).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.layout import NF4_BLOCKSIZE, row_range
from fsdp_qlora.model.expert_layout import CheckpointLayout, checkpoint_layout
from fsdp_qlora.model.experts import expert_params, expert_shapes, quantize_experts
from fsdp_qlora.model.host_memory import large_allocations_via_mmap
from fsdp_qlora.model.nf4 import NF4Tensor, PackedNF4, nf4_bytes, quantize_nf4_rows
from fsdp_qlora.model.nf4_experts import empty_nf4_experts, set_expert
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.model.registry import is_router
from fsdp_qlora.model.shard_reader import RowRange, RowReader, read_ahead, read_index
from fsdp_qlora.model.sources import safetensors_files
from fsdp_qlora.model.structure import decoder_layers

# Frozen weights other than NF4 (embeddings, norms, lm_head, biases, routers) are kept as checkpoints
# ship them, bf16; FSDP2's mixed precision casts them to the compute dtype when gathered. Where they are
# replicated rather than sharded (distributed/sharding.py: a dp_shard of one rank) FSDP2 does not
# manage them: they are plain tensors, already in the compute dtype, every row on every rank.
STORAGE_DTYPE = torch.bfloat16
# Read-ahead per rank: enough for several 16 MiB reads in flight while a slice is quantized,
# small next to a shard file (a 70B checkpoint's are ~10 GB) even with 8 ranks per node.
READ_AHEAD_BYTES = 64 << 20


def materialize_computed_buffers(model: nn.Module, device: torch.device,
                                 compute_dtype: torch.dtype = STORAGE_DTYPE) -> None:
    """Give the buffers a checkpoint does not store (rotary inverse frequencies, Gemma's embedding
    scale, ...) their values the way transformers' `from_pretrained` does: allocated on `device`,
    then filled by the model class' own `_init_weights`, with every parameter marked initialized so
    that only the buffers are touched (parameters are still on meta; their weights come from the
    checkpoint). A float buffer that init leaves unset (NaN-filled here) is an error, not garbage.

    A float buffer the class creates in the default dtype (the meta model's, `STORAGE_DTYPE`) is made
    in `compute_dtype`, as transformers makes it for a model loaded in that dtype: Gemma's embedding
    scale sqrt(hidden) is 55.5 in bf16 but 55.4256 in fp32, and FSDP2's mixed precision casts
    parameters, not buffers (found by the fp32 oracle, tests/test_architectures.py). Buffers the class
    makes fp32 on purpose (rotary frequencies) stay fp32.
    """
    buffers = [(name, buf) for name, buf in model.named_buffers() if buf.is_meta]
    if not buffers:
        return
    for name, buf in buffers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        persistent = attr not in parent._non_persistent_buffers_set
        dtype = compute_dtype if buf.dtype == STORAGE_DTYPE else buf.dtype
        value = torch.full_like(buf, float("nan"), device=device, dtype=dtype) if buf.is_floating_point() \
            else torch.zeros_like(buf, device=device)
        parent.register_buffer(attr, value, persistent=persistent)
    params = list(model.parameters())
    for param in params:
        param._is_hf_initialized = True
    try:
        model.initialize_weights()
    finally:
        for param in params:
            del param._is_hf_initialized
    unset = [name for name, buf in model.named_buffers() if buf.is_floating_point() and buf.isnan().all()]
    if unset:
        raise ConfigError(f"model_type {model.config.model_type!r}: transformers' init does not compute the "
                          f"buffers {', '.join(unset[:3])}, so they cannot be rebuilt without a checkpoint value")


def quantize_decoder_linears(model: nn.Module, shard_count: int) -> list[str]:
    """Swap every nn.Linear of the decoder layers for an NF4Linear, and every experts module's fused
    weights for NF4 placeholders (on meta).

    All block linears and experts are quantized (as in QLoRA), whether or not they get an adapter;
    embeddings, norms, lm_head, routers (2-D parameters of the router modules) and the linears the
    registry names as routers (Qwen2-MoE's shared_expert_gate) stay in the compute dtype.
    """
    layers = decoder_layers(model)
    replaced = []
    for layer_name, layer in layers.named_children():
        for name, module in list(layer.named_modules()):
            full_name = f"layers.{layer_name}.{name}"
            if expert_params(module):
                quantize_experts(full_name, module, shard_count)
                replaced.append(full_name)
            if not isinstance(module, nn.Linear) or is_router(model.config.model_type, name):
                continue
            _check_quantizable(full_name, module, shard_count)
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            nf4 = NF4Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device="meta", bias_dtype=STORAGE_DTYPE)
            setattr(parent, child, nf4)
            replaced.append(full_name)
    return replaced


def _check_quantizable(name: str, linear: nn.Linear, shard_count: int) -> None:
    rows, cols = linear.out_features, linear.in_features
    if rows % shard_count or (rows // shard_count) * cols % NF4_BLOCKSIZE or cols % 2:
        raise ConfigError(
            f"{name} ({rows}x{cols}) cannot be split into {shard_count} NF4 shards: each shard "
            f"must hold whole rows and a multiple of {NF4_BLOCKSIZE} weights; use a world size that divides {rows}"
        )


# ---- streaming load --------------------------------------------------------------------------
def checkpoint_key_to_param(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """HF checkpoint key -> the (module, attribute) pairs holding it (several when tied).

    A module that wraps the checkpoint's module (an adapter around a linear) says so with a
    `checkpoint_child` attribute naming the child that holds the checkpoint's tensors: the name
    component is dropped (``q_proj.base.weight`` holds the checkpoint's ``q_proj.weight``)."""
    # "...q_proj.base." -> "...q_proj."
    wrapped = {f"{name}.{module.checkpoint_child}.": f"{name}." for name, module in model.named_modules()
               if getattr(module, "checkpoint_child", None)}
    mapping: dict[str, list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{attr}" if module_name else attr
            if param.requires_grad:
                continue  # adapters are ours, not the checkpoint's
            for ours, theirs in wrapped.items():
                if full.startswith(ours):
                    full = theirs + full[len(ours):]
            mapping.setdefault(full, []).append((module, attr))
    return mapping


def local_row_range(rows: int, mesh, placements=None) -> tuple[int, int]:
    """The rows of dim 0 this rank owns under FSDP2's `torch.chunk` sharding.

    `placements` are the parameter's own (default: Shard(0) on every mesh dim). Only mesh
    dims that shard dim 0 split the rows: under HSDP, ``[Replicate(), Shard(0)]`` gives the
    rank's chunk within its dp_shard group; under ddp, ``[Replicate()]`` gives every row.
    """
    placements = placements if placements is not None else [Shard(0)] * mesh.ndim
    start, stop = 0, rows
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            first, last = row_range(stop - start, mesh.size(dim), mesh.get_local_rank(dim))
            start, stop = start + first, start + last
    return start, stop


# A replicated frozen parameter (a plain tensor, not FSDP2's) may still be *loaded* split: each rank of
# `group` reads and quantizes its chunk of the rows, then the chunks are all-gathered into the whole
# tensor every rank keeps (distributed/sharding.py: the model unit's base, gathered once). The group
# rides on the placeholder, as a DTensor's mesh and placements do.
_LOAD_GROUP = "_fsdp_qlora_load_group"


def load_split(param: nn.Parameter, group) -> None:
    """Mark a replicated frozen placeholder to be loaded split over `group`, then all-gathered."""
    setattr(param, _LOAD_GROUP, group)


def _load_group(param: torch.Tensor):
    """The group a replicated placeholder is loaded split over (None: FSDP2's DTensors, which carry
    their own mesh, and placeholders every rank loads whole)."""
    group = getattr(param, _LOAD_GROUP, None)
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _gather_whole(local: torch.Tensor, group) -> torch.Tensor:
    """The whole tensor from every rank's chunk of dim 0 (chunks in rank order; they may differ in
    length, as torch.chunk splits). NF4: the packed codes and 8-bit absmax (and, for experts, every
    constant: all have the experts on dim 0) are gathered; a 2-D weight's nested absmax and offset
    are the whole weight's already."""
    if isinstance(local, PackedNF4):
        whole_constants = not isinstance(local, NF4Tensor)
        inner = [_gather_whole(t, group) if index < 2 or whole_constants else t
                 for index, t in enumerate(local.inner_tensors())]
        if isinstance(local, NF4Tensor):
            return NF4Tensor(*inner, local.compute_dtype, 0)
        return type(local)(*inner, local.compute_dtype)
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64), group=group)
    rows = [int(n) for n in sizes]
    # gloo gathers equal sizes only: pad every chunk to the longest (a 1-row router gate over 2 ranks
    # is chunks of 1 and 0 rows), then trim
    padded = local.new_zeros((max(rows), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])


def load_base_weights(model: nn.Module, model_dir: Path, device: torch.device,
                      workers: int = TrainConfig.load_workers, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Install this rank's rows of every checkpoint tensor, read by `workers` threads; NF4 weights
    dequantize into `compute_dtype` by default (the matmuls follow their input's dtype).

    The checkpoint's tensor names and shapes are checked against the model first, from the
    safetensors headers alone, so a mismatch is reported before any weight is read. Experts come
    from whatever layout the checkpoint stores them in (model/expert_layout.py), a rank reading only
    the experts it owns, one expert at a time."""
    targets = checkpoint_key_to_param(model)
    layout = checkpoint_layout_of(model, model_dir, targets)
    present = set(layout.plain) | set(layout.experts)
    missing = sorted(set(targets) - present - tied_keys(model, targets, present))
    if missing:
        raise ConfigError(f"{model_dir} lacks weights for {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}: the checkpoint does not match its config.json")
    jobs = [(_local_rows(entry, targets[name][0]), name) for name, entry in layout.plain.items()
            if name in targets]  # skips e.g. rotary caches some checkpoints carry
    stacks = {name: _LocalExperts(targets[name], pieces, device, compute_dtype) for name, pieces in layout.experts.items()}
    jobs += [(piece.source, (stack, piece)) for stack in stacks.values() for piece in stack.local_pieces]
    with large_allocations_via_mmap(), RowReader(workers) as reader:
        for (rows, local_rows), (_, job) in zip(read_ahead([rows for rows, _ in jobs], reader, READ_AHEAD_BYTES), jobs):
            if isinstance(job, str):
                for module, attr in targets[job]:
                    install_local_rows(module, attr, rows.start, local_rows, device, compute_dtype)
            else:
                stack, piece = job
                stack.add(piece, local_rows)
    for stack in stacks.values():
        stack.install()
    tie_missing(model, targets, present)
    check_all_loaded(model)


class _LocalExperts:
    """One fused expert parameter being filled on this rank: the experts it owns, each installed (and
    quantized, for NF4) as soon as all its parts are read, so no more than one expert is held in
    bf16 beyond the read-ahead."""

    def __init__(self, holders: list[tuple[nn.Module, str]], pieces, device: torch.device, compute_dtype: torch.dtype):
        self.holders = holders
        module, attr = holders[0]
        param = getattr(module, attr)
        self.param = param
        experts, rows, cols = expert_shapes(module)[attr]
        self.start, self.stop = param_rows(param, experts)
        self.local_pieces = [piece for piece in pieces if self.start <= piece.expert < self.stop]
        self.parts = 1 + max(piece.part for piece in pieces)
        self.quantized = param.dtype == torch.uint8
        local = self.stop - self.start
        self.local = (empty_nf4_experts(local, rows, cols, device, compute_dtype) if self.quantized
                      else torch.empty(local, rows, cols, dtype=param.dtype, device=device))
        self.pending: dict[int, dict[int, torch.Tensor]] = {}

    def add(self, piece, rows: torch.Tensor) -> None:
        parts = self.pending.setdefault(piece.expert, {})
        parts[piece.part] = rows.reshape(-1, rows.shape[-1])  # a fused tensor's slice is (1, a, b)
        if len(parts) < self.parts:
            return
        weight = torch.cat([parts[part] for part in range(self.parts)]).to(self.local.device)
        del self.pending[piece.expert]
        slot = piece.expert - self.start
        if self.quantized:
            set_expert(self.local, slot, weight.to(STORAGE_DTYPE))  # bitsandbytes' input: the bf16 weight
        else:
            self.local[slot].copy_(weight)

    def install(self) -> None:
        assert not self.pending, "an expert's parts were not all read"
        install_local(self.holders, self.local)


def install_local(holders: list[tuple[nn.Module, str]], local: torch.Tensor) -> None:
    """Make `local` (this rank's part, e.g. its whole experts) what every (module, attribute) in
    `holders` holds: the shard of the sharded parameter, or the whole tensor of a replicated one."""
    module, attr = holders[0]
    placeholder = getattr(module, attr)
    group = _load_group(placeholder)
    loaded = _frozen_param(local if group is None else _gather_whole(local, group), placeholder)
    for module, attr in holders:
        setattr(module, attr, loaded)


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shards, NF4 weights with their constants."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += nf4_bytes(local) if isinstance(local, PackedNF4) else local.numel() * local.element_size()
    return total


def checkpoint_layout_of(model: nn.Module, model_dir: Path, targets=None) -> CheckpointLayout:
    """Where the checkpoint in `model_dir` holds each of the model's tensors, from the headers alone
    (raises ConfigError, one line, for experts that disagree with config.json)."""
    targets = targets or checkpoint_key_to_param(model)
    index = {name: entry for file in safetensors_files(model_dir) for name, entry in read_index(file).items()}
    fused = {key: expert_shapes(module)[attr] for key, [(module, attr), *_] in targets.items()
             if attr in expert_shapes(module)}
    model_type = getattr(getattr(model, "config", None), "model_type", "")  # "" for a bare module (tests)
    return checkpoint_layout(model_type, index, fused)


def _local_rows(entry, holder: tuple[nn.Module, str]) -> RowRange:
    module, attr = holder
    param = getattr(module, attr)
    quantized = isinstance(module, NF4Linear) and attr == "weight"  # stored packed: check the logical shape
    expected = (module.out_features, module.in_features) if quantized else tuple(param.shape)
    if expected != entry.shape:
        raise ConfigError(f"{entry.file.name}: {entry.name} has shape {entry.shape}, the model's config.json "
                         f"gives {expected}: the checkpoint does not match its config.json")
    return RowRange(entry, *param_rows(param, entry.rows))


def param_rows(param: torch.Tensor, rows: int) -> tuple[int, int]:
    """The rows of dim 0 this rank reads of `param`: its FSDP2 shard's; for a parameter FSDP2 does not
    manage (replicated frozen weights) all of them, or its chunk when it is loaded split (`load_split`)."""
    if isinstance(param, DTensor):
        return local_row_range(rows, param.device_mesh, param.placements)
    group = _load_group(param)
    return (0, rows) if group is None else row_range(rows, dist.get_world_size(group), dist.get_rank(group))


def _frozen_param(local: torch.Tensor, placeholder: torch.Tensor) -> nn.Parameter:
    """This rank's loaded rows as the parameter that replaces `placeholder`: a DTensor shard laid
    out like it, or the plain tensor itself where the placeholder is one."""
    if isinstance(placeholder, DTensor):
        local = DTensor.from_local(local, placeholder.device_mesh, placeholder.placements, run_check=False,
                                   shape=placeholder.shape, stride=placeholder.stride())
    return nn.Parameter(local, requires_grad=False)


def install_local_rows(module: nn.Module, attr: str, start: int, rows: torch.Tensor,
                       device: torch.device, compute_dtype: torch.dtype) -> None:
    """Install `rows` (rows `start`.. of the whole tensor, this rank's under FSDP2) as the local shard
    of ``module.attr``, quantized to NF4 when it is an NF4Linear's weight."""
    param = getattr(module, attr)
    rows = rows.to(device)
    if isinstance(module, NF4Linear) and attr == "weight":
        # The same NF4 bytes at every world size: the ranks splitting this weight exchange their
        # first-level absmax so that double quantization sees the whole weight (model/nf4.py).
        first_block = start * module.in_features // NF4_BLOCKSIZE
        local = quantize_nf4_rows(rows.to(STORAGE_DTYPE), compute_dtype, _absmax_gather(param), first_block)
    else:
        local = rows.to(param.dtype)
    group = _load_group(param)
    setattr(module, attr, _frozen_param(local if group is None else _gather_whole(local, group), param))


def _absmax_gather(param: torch.Tensor):
    """All-gather over the mesh dims that split this parameter's rows (None: this rank has them all)."""
    if not isinstance(param, DTensor):
        group = _load_group(param)
        return None if group is None else lambda local_absmax: _gather_whole(local_absmax, group)
    dims = [dim for dim, p in enumerate(param.placements) if isinstance(p, Shard) and p.dim == 0
            and param.device_mesh.size(dim) > 1]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("NF4 weights are sharded over one mesh dimension (dp_shard)")
    group = param.device_mesh.get_group(dims[0])
    size = param.device_mesh.size(dims[0])

    def gather(local_absmax: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local_absmax) for _ in range(size)]
        dist.all_gather(parts, local_absmax.contiguous(), group=group)  # group rank i = mesh coordinate i = row block i
        return torch.cat(parts)

    return gather


def tied_keys(model: nn.Module, targets, present) -> set[str]:
    """Keys a tied model's checkpoint may omit: lm_head.weight, which is the embedding."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    return {key for key in targets if key not in present and key.endswith("lm_head.weight")}


def tie_missing(model: nn.Module, targets, loaded: set[str]) -> None:
    """Checkpoints of tied models omit lm_head.weight: point it at the embedding."""
    for key in tied_keys(model, targets, loaded):
        for module, attr in targets[key]:
            setattr(module, attr, model.get_input_embeddings().weight)


def check_all_loaded(model: nn.Module) -> None:
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
                 or (isinstance(t, DTensor) and t.to_local().is_meta)]
    if leftovers:
        raise ValueError(f"weights never loaded: {', '.join(leftovers[:5])}")
