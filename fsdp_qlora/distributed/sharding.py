"""FSDP2 sharding: a DeviceMesh over the world, each decoder layer then the root.

Three layouts (``--sharding``); fsdp and hsdp are FSDP2's per-parameter DTensors, ddp stays out of FSDP2:

* ``fsdp``: a 1-D mesh ``("dp_shard",)`` over every rank; each parameter (the NF4 base and the
  adapters) is split by rows across all ranks, all-gathered per layer for compute; with the model
  unit (``--fsdp-units model``, auto's choice when the whole base fits) the frozen base is gathered
  once, at load, and only the adapters are gathered per step (see `shard_model`).
* ``hsdp``: a 2-D mesh ``("dp_replicate", "dp_shard")`` = (nodes, ranks per node). Parameters are
  sharded within a node and replicated across nodes (placements ``[Replicate(), Shard(0)]``):
  all-gathers and reduce-scatters stay on the fast intra-node links; only the (tiny) adapter
  gradients cross nodes, as an all-reduce over ``dp_replicate``. The NF4 quantization slice is
  a rank's shard in ``dp_shard``, so every node holds the same bytes.
* ``ddp``: the HSDP mesh with a shard dim of one rank, ``(world, 1)``: every rank holds the
  whole model, the NF4 base (one quantization slice per weight, as on one GPU) and the adapters,
  and nothing of it is FSDP2's (distributed/replicate.py): the adapters' gradients are all-reduced
  in buckets during backward, nothing is ever gathered or copied per step. Its checkpoints are DCP
  checkpoints of the same adapter and optimizer keys (a checkpoint resumes under any of the three
  layouts). For a model whose 4-bit base fits on one GPU, replication skips every all-gather.

``auto`` (the default) is ``ddp`` when the caller found that the whole model fits each GPU (the
memory plan: train/plan_advice.py `auto_replicates`; replication skips every all-gather), else
``hsdp`` when the job spans several nodes and ``fsdp`` otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fsdp_qlora.config import SHARDING_TYPES
from fsdp_qlora.distributed.env import DistEnv
from fsdp_qlora.distributed.grad_norm import ReducedSquares
from fsdp_qlora.distributed.pair import PairAllGather, is_pair
from fsdp_qlora.distributed.replicate import replicate_adapters
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.loader import load_split
from fsdp_qlora.model.structure import decoder_layers

SHARDING_CHOICES = SHARDING_TYPES
SHARD_DIM = "dp_shard"
REPLICATE_DIM = "dp_replicate"


class ShardingError(ConfigError):
    """A layout that cannot be built for this world (reported as one line)."""


@dataclass(frozen=True)
class Layout:
    strategy: str  # fsdp | hsdp | ddp
    replicate: int  # size of the dp_replicate dim (1 for fsdp)
    shard: int  # size of the dp_shard dim (1 for ddp)

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.shard,) if self.strategy == "fsdp" else (self.replicate, self.shard)

    @property
    def mesh_dim_names(self) -> tuple[str, ...]:
        return (SHARD_DIM,) if self.strategy == "fsdp" else (REPLICATE_DIM, SHARD_DIM)


def detect_nodes(world_size: int, environ: dict | None = None) -> int:
    """Nodes in this job: WORLD_SIZE / LOCAL_WORLD_SIZE (torchrun, launch.slurm_env), else
    SLURM_NNODES, else 1. They disagree only in a broken launch: that is an error."""
    environ = os.environ if environ is None else environ
    nodes = None
    local = environ.get("LOCAL_WORLD_SIZE")
    if local and int(local) > 0:
        if world_size % int(local):
            raise ShardingError(f"WORLD_SIZE {world_size} is not a multiple of LOCAL_WORLD_SIZE {local}: "
                                "every node must run the same number of ranks")
        nodes = world_size // int(local)
    slurm_nodes = environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")
    if slurm_nodes and environ.get("SLURM_JOB_ID") and world_size > 1:
        if nodes is not None and nodes != int(slurm_nodes) and nodes > 1:
            raise ShardingError(f"node-count mismatch: the ranks span {nodes} nodes (WORLD_SIZE {world_size} / "
                                f"LOCAL_WORLD_SIZE {local}) but SLURM allocated {slurm_nodes}: launch one torchrun "
                                "per node (srun --ntasks-per-node=1) with --nnodes equal to the allocation")
        if nodes is None:
            nodes = int(slurm_nodes)
    return nodes or 1


def resolve_layout(sharding: str, world_size: int, replicate_groups: int = 0,
                   environ: dict | None = None, replication_fits: bool = False) -> Layout:
    """--sharding and --replicate-groups (0 = one group per node) -> the mesh layout; `replication_fits`:
    every rank can hold the whole model (auto then replicates, unless replica groups were asked for)."""
    if sharding not in SHARDING_CHOICES:
        raise ShardingError(f"--sharding {sharding!r} is not one of {', '.join(SHARDING_CHOICES)}")
    if replicate_groups < 0:
        raise ShardingError(f"--replicate-groups must be >= 0 (0 = one per node), got {replicate_groups}")
    groups = replicate_groups or detect_nodes(world_size, environ)
    if sharding == "auto":
        replicate = replication_fits and world_size > 1 and not replicate_groups
        sharding = "ddp" if replicate else "hsdp" if groups > 1 else "fsdp"
    if sharding == "fsdp":
        return Layout("fsdp", 1, world_size)
    if sharding == "ddp":
        return Layout("ddp", world_size, 1)
    if world_size % groups:
        raise ShardingError(f"--sharding hsdp: {world_size} ranks cannot form {groups} equal replica groups; "
                            "set --replicate-groups to a divisor of the world size")
    return Layout("hsdp", groups, world_size // groups)


def build_mesh(env: DistEnv, sharding: str = "fsdp", replicate_groups: int = 0,
               replication_fits: bool = False) -> DeviceMesh:
    layout = resolve_layout(sharding, env.world_size, replicate_groups, replication_fits=replication_fits)
    mesh = init_device_mesh(env.device.type, layout.mesh_shape, mesh_dim_names=layout.mesh_dim_names)
    if env.is_main and env.world_size > 1:
        why = " (auto: the whole model fits each GPU)" if sharding == "auto" and layout.strategy == "ddp" else ""
        print(f"sharding: {describe(mesh)}{why}", flush=True)
    return mesh


def shard_size(mesh: DeviceMesh) -> int:
    """Ranks one parameter is split across (the NF4 quantization slices per weight)."""
    names = mesh.mesh_dim_names or (SHARD_DIM,)
    return mesh.size(names.index(SHARD_DIM)) if SHARD_DIM in names else 1


def strategy_of(mesh: DeviceMesh) -> str:
    names = tuple(mesh.mesh_dim_names or (SHARD_DIM,))
    if names == (SHARD_DIM,):
        return "fsdp"
    return "ddp" if shard_size(mesh) == 1 and mesh.size() > 1 else "hsdp"


def describe(mesh: DeviceMesh) -> str:
    names = mesh.mesh_dim_names or (SHARD_DIM,)
    dims = " x ".join(f"{n}={mesh.size(i)}" for i, n in enumerate(names))
    return f"{strategy_of(mesh)} ({dims})"


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.bfloat16,
                fsdp_options: dict | None = None, per_layer_units: bool = True,
                replicate_frozen: bool = False) -> nn.Module:
    """`fully_shard` the input embeddings, every decoder layer (unless not `per_layer_units`), then
    the root, on the mesh.

    A unit's parameters are all-gathered, freed and their gradients reduced as one collective each:
    per-layer units overlap communication with compute layer by layer and hold one layer gathered.
    Without them the layers belong to the root's unit: one all-gather and one gradient reduction
    per step, the whole model gathered from forward to backward; on a small model, where the
    per-collective and per-hook costs dominate, that is faster (docs/benchmarks.md). Not grouped as
    ``fully_shard([layer, layer, ...])``: FSDP2 then still runs each module's hooks and a
    reduce-scatter per module, and was measured slower than either.

    Compute runs in `param_dtype` (the fp32 adapters are cast for the matmuls); gradients
    are reduced in fp32 so that averaging across ranks loses nothing.

    ``--sharding ddp`` over several ranks shards nothing: the frozen weights are cast
    to `param_dtype` as below and the adapters are replicated (distributed/replicate.py), unless
    FSDP2 is to offload them to the host (``offload_policy``, --cpu-offload).

    `replicate_frozen` (`frozen_replication`): the frozen weights (NF4 base, embeddings, norms,
    lm_head) are not FSDP2's to manage at all (`ignored_params`); every rank holds them whole, as
    plain tensors cast once to `param_dtype` (what the mixed-precision policy would cast them to at
    every gather; NF4 bytes are not cast: they dequantize into the activations' dtype). FSDP2 then
    holds only the adapters: their gradients are still reduced once per unit, their state still
    checkpoints as DTensors under every layout. Two cases:

    * a dp_shard of one rank (one process): with nothing to split, FSDP2 would still copy
      every frozen weight into an "all-gather" buffer each forward (and again in backward after a
      reshard) and hold that second copy while gathered;
    * the model unit (``per_layer_units`` off) over several ranks: FSDP2 would all-gather the whole
      frozen base at every step, and hold it gathered from forward to the end of backward (the plan
      that chose the model unit counts it). The base never changes, so it is gathered once, when
      loading: each rank of the dp_shard group still reads and quantizes only its rows (the same
      bytes as any other layout), then the rows are all-gathered (model/loader.py `load_split`). The
      rank holds the whole base and no shard of it: less than FSDP2's shard + gathered copy, and no
      per-step all-gather (on CPU, 1 GB/s of gloo: ~0.1 s of a 0.5 s SmolLM2-135M step).

    The embeddings are their own unit so that their all-gathered weight (vocab x hidden: 0.5 GiB
    on Llama-2-70B, 2 GiB on Llama-3's 128k vocabulary) is freed right after the lookup: they
    are frozen and their input is token ids, so backward never needs them again. lm_head (with
    the final norm) stays in the root, gathered from the end of forward through backward, when
    the chunked loss uses it (train/loss.py). A tied lm_head shares the embedding's weight, so
    then both stay in the root.
    """
    # cast_forward_inputs=False: the layers get exactly what the model passes them. FSDP2's default
    # casts every floating input to param_dtype, which rounds the fp32 rotary cos/sin OLMo 2 hands
    # its layers (logits then differ from transformers + bitsandbytes by ~1%); hidden states are
    # already in the compute dtype, so nothing else changes.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # fsdp_options: reshard_after_forward / offload_policy (fsdp_qlora.train.memory).
    options = dict(fsdp_options or {})
    if strategy_of(mesh) == "ddp" and "offload_policy" not in options:  # nothing for FSDP2 to do (replicate.py)
        _frozen_in_compute_dtype(model, param_dtype)
        return replicate_adapters(model, mesh.get_group(REPLICATE_DIM))
    if replicate_frozen:
        options["ignored_params"] = _frozen_in_compute_dtype(model, param_dtype)
        for param in options["ignored_params"] if shard_size(mesh) > 1 else ():
            load_split(param, mesh.get_group(SHARD_DIM) if SHARD_DIM in (mesh.mesh_dim_names or ()) else mesh.get_group())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (head is None or head.weight is not embeddings.weight) and not replicate_frozen:
        fully_shard(embeddings, mesh=mesh, mp_policy=policy, **{**options, "reshard_after_forward": True})
    for layer in decoder_layers(model) if per_layer_units else []:
        fully_shard(layer, mesh=mesh, mp_policy=policy, **options)
    options.pop("reshard_after_forward", None)  # the root keeps FSDP2's own choice (no reshard: backward is next)
    fully_shard(model, mesh=mesh, mp_policy=policy, **options)
    if mesh.device_type == "cpu" and strategy_of(mesh) == "fsdp" and mesh.size() > 1:
        _cpu_collectives(model, mesh.get_group())
    return model


def _cpu_collectives(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Every unit reduces its gradients through one `ReducedSquares`, kept as `model.reduced_squares`
    for the loop's gradient clipping (distributed/grad_norm.py): one collective fewer per step. Over
    two ranks the units' all-gathers and reductions are exchanges (distributed/pair.py)."""
    reduced = ReducedSquares()
    gather = PairAllGather() if is_pair(group) else None
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_custom_reduce_scatter(reduced)
            if gather is not None:
                unit.set_custom_all_gather(gather)
    model.reduced_squares = reduced


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces the gradients across ranks (off for all but the last
    micro-batch of a step: they accumulate locally)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    elif getattr(model, "gradient_all_reduce", None) is not None:
        model.gradient_all_reduce.requires_sync = enabled


def reduced_squares_of(model: nn.Module) -> ReducedSquares | None:
    """The model's `ReducedSquares`, if its gradients are reduced through one (`shard_model`)."""
    return getattr(model, "reduced_squares", None)


def frozen_replication(shard_ranks: int, per_layer_units: bool = True, cpu_offload: bool = False) -> bool:
    """Whether the frozen weights stay out of FSDP2, held whole by every rank (`shard_model`'s
    `replicate_frozen`; the planner counts memory by the same rule): when no parameter is split
    (`shard_ranks`, the dp_shard size, is 1) or the layers are in the model unit (the whole base
    gathered anyway), unless FSDP2's CPU offload is to move them to the host."""
    return (shard_ranks == 1 or not per_layer_units) and not cpu_offload


def _frozen_in_compute_dtype(model: nn.Module, dtype: torch.dtype) -> set[nn.Parameter]:
    """The frozen parameters (still meta placeholders), the floating ones retyped to `dtype` in place,
    so that the loader fills them in the compute dtype and shared (tied) parameters stay shared."""
    frozen = {param for param in model.parameters() if not param.requires_grad}
    for param in frozen:
        if param.is_floating_point() and param.dtype != dtype:
            param.data = torch.empty_like(param, dtype=dtype, device="meta")
    return frozen
