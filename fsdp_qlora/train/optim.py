"""Optimizers and learning-rate schedule for the adapter parameters.

``--optimizer``:

* ``adamw``: torch's AdamW, fp32 state (8 bytes per adapter parameter).
* ``adamw8bit``: bitsandbytes' blockwise 8-bit AdamW (2 bytes + 8 bytes per 256 per parameter).
* ``paged_adamw`` / ``paged_adamw8bit``: the same with state in CUDA unified memory, which the
  driver pages out to host memory under GPU memory pressure (CUDA only).

bitsandbytes under FSDP2 (bitsandbytes #1403): its kernels take plain tensors, but FSDP2's
parameters and gradients are DTensors. `ShardedBnbAdamW` runs each kernel on the rank's local
shard (a plain tensor that *is* the parameter's storage), so every rank updates exactly its rows.

Saving their state (accelerate #1362, axolotl #2744): the 8-bit state is a uint8 code per element
plus an fp32 ``absmax`` per block of 256 elements, kept as plain per-rank tensors; handed to DCP
as they are, every rank's would carry the same key and only one would be written. Here
`state_dict()` hands DCP DTensors instead, laid out like the parameter:

* ``state1`` / ``state2`` (uint8 codes) have the parameter's shape and placements;
* ``absmax1`` / ``absmax2`` form a 1-D DTensor of ``ceil(numel / 256)`` blocks, sharded like the
  parameter's rows. This is exact because a parameter only gets 8-bit state when every rank's
  shard is a whole number of blocks (rows x columns a multiple of 256): the blocks of the
  flattened full parameter then fall the same way at any such world size, and the optimizer
  itself computes the same thing whatever the world size;
* ``step`` is a tensor (a Python int would be pickled by DCP, and checkpoints never unpickle).

32-bit state is saved as ``exp_avg`` / ``exp_avg_sq`` (torch AdamW's names). A resume must use the
optimizer that wrote the checkpoint (DCP reports the state keys it cannot find otherwise).
"""

from __future__ import annotations

import logging
import math

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.optim.lr_scheduler import LambdaLR

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.layout import OPTIMIZER_BLOCKSIZE, row_counts


def build_optimizer(params: list[torch.nn.Parameter] | list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """`params`: parameters, or param groups (LoRA+: `peft.lora.adapter_param_groups`)."""
    name = getattr(cfg, "optimizer", "adamw")
    if name == "adamw":
        return LocalShardAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
    return ShardedBnbAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                           optim_bits=8 if name.endswith("8bit") else 32, is_paged=name.startswith("paged_"),
                           min_8bit_size=getattr(cfg, "min_8bit_size", 4096))


class LocalShardAdamW(torch.optim.AdamW):
    """torch's AdamW, its kernel run on each DTensor's local shard (a plain tensor that is the
    parameter's storage) instead of through DTensor's dispatch.

    The parameters and the state stay DTensors (`state_dict()` and DCP see torch's AdamW); only the
    tensors handed to the kernel are the local shards. AdamW is elementwise, so this is the same
    arithmetic, bit for bit (tests/test_optimizers.py). fused: one kernel per step for all the
    adapters. A step over 54 row-sharded adapter tensors like tiny-llama's on the 2-core CPU (2 ranks,
    tests/workers/local_adamw_worker.py prints both): 0.36 ms on the local shards against 0.89 ms
    through DTensor (foreach through DTensor: 1.09 ms for the tiny model's 56, measured earlier).
    """

    def _init_group(self, group, *tensor_lists):
        # torch's Adam._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
        # state_steps) fills these lists (creating DTensor state on the first step); the kernel
        # then gets their local shards.
        has_complex = super()._init_group(group, *tensor_lists)
        for tensors in tensor_lists:
            tensors[:] = [_local(t) for t in tensors]
        return has_complex


def _bnb():
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _row_shards(param: torch.Tensor) -> int | None:
    """Ranks the parameter's rows are split over (1 if not sharded), None for other layouts."""
    if not isinstance(param, DTensor):
        return 1
    count = 1
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                return None
            count *= param.device_mesh.size(dim)
    return count


def blocks_align(shape: torch.Size | tuple[int, ...], shards: int | None) -> bool:
    """Whether every rank's share of `shape` (rows split by torch.chunk over `shards`) is a whole
    number of 256-element blocks, except the last, so that the blocks of the full flattened tensor
    and of each shard coincide."""
    if shards is None:
        return False
    rows, row_numel = shape[0], math.prod(shape[1:])
    sizes = [count * row_numel for count in row_counts(rows, shards) if count]
    if any(s % OPTIMIZER_BLOCKSIZE for s in sizes[:-1]):
        return False
    blocks = math.ceil(rows * row_numel / OPTIMIZER_BLOCKSIZE)
    block_chunk = math.ceil(blocks / shards)
    expected = [max(0, min(block_chunk, blocks - i * block_chunk)) for i in range(shards)]
    return [math.ceil(s / OPTIMIZER_BLOCKSIZE) for s in sizes] == [e for e in expected if e][: len(sizes)]


def _as_dtensor_like(local: torch.Tensor, param: torch.Tensor, shape=None) -> torch.Tensor:
    if not isinstance(param, DTensor):
        return local
    shape = param.shape if shape is None else torch.Size(shape)
    stride = param.stride() if shape == param.shape else tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride)


def _make_sharded_bnb_class():
    bnb = _bnb()

    class _ShardedBnbAdamW(bnb.optim.optimizer.Optimizer2State):
        """bitsandbytes AdamW (8- or 32-bit, paged or not) on FSDP2-sharded parameters."""

        def __init__(self, params, lr, weight_decay, betas, optim_bits, is_paged, min_8bit_size=4096):
            super().__init__("adam", params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                             optim_bits=optim_bits, min_8bit_size=min_8bit_size, is_paged=is_paged)
            self.min_8bit_numel = min_8bit_size
            if optim_bits == 8:
                self.fill_qmap()

        # -- which parameters get 8-bit state: a property of the full parameter, never of a shard --
        def uses_8bit(self, param: torch.Tensor) -> bool:
            return (self.args.optim_bits == 8 and param.numel() >= self.min_8bit_numel
                    and blocks_align(param.shape, _row_shards(param)))

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            param = self.param_groups[gindex]["params"][pindex]
            # bitsandbytes compares min_8bit_size with the numel it is given (here a shard's).
            config["min_8bit_size"] = 0 if self.uses_8bit(param) else math.inf
            return config

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, param in enumerate(group["params"]):
                    if param.grad is None:
                        continue
                    self._step_one(group, param, gindex, pindex)
            if self.is_paged and torch.cuda.is_available():
                torch.cuda.synchronize()  # paged updates are asynchronous
            return loss

        def _step_one(self, group, param, gindex, pindex) -> None:
            local = _local(param)
            if not local.is_contiguous():
                raise RuntimeError("bitsandbytes optimizers need contiguous parameter shards")
            # A Parameter aliasing the shard's storage: bitsandbytes updates it in place.
            proxy = torch.nn.Parameter(local, requires_grad=False)
            proxy.grad = _local(param.grad).contiguous()
            state = self.state[param]
            self.state[proxy] = state  # the same dict: bitsandbytes reads/writes it under the proxy
            try:
                if len(state) == 0:
                    self.init_state(group, proxy, gindex, pindex)
                self.prefetch_state(proxy)
                self.update_step(group, proxy, gindex, pindex)
            finally:
                del self.state[proxy]
            assert proxy.data_ptr() == local.data_ptr(), "the update must land in the parameter's shard"

        # -- checkpoints: DTensors only, laid out like the parameters --
        def _params(self) -> list[torch.Tensor]:
            return [p for group in self.param_groups for p in group["params"]]

        def state_dict(self):
            state_dict = torch.optim.Optimizer.state_dict(self)
            params = self._params()
            state_dict["state"] = {index: self._portable(params[index], state)
                                   for index, state in state_dict["state"].items()}
            return state_dict

        def _portable(self, param, state) -> dict[str, torch.Tensor]:
            out = {"step": torch.tensor(float(state["step"]))}
            if state["state1"].dtype == torch.uint8:
                blocks = (math.ceil(param.numel() / OPTIMIZER_BLOCKSIZE),)
                out["state1"] = _as_dtensor_like(state["state1"], param)
                out["state2"] = _as_dtensor_like(state["state2"], param)
                out["absmax1"] = _as_dtensor_like(state["absmax1"], param, blocks)
                out["absmax2"] = _as_dtensor_like(state["absmax2"], param, blocks)
            else:
                out["exp_avg"] = _as_dtensor_like(state["state1"], param)
                out["exp_avg_sq"] = _as_dtensor_like(state["state2"], param)
            return out

        def load_state_dict(self, state_dict) -> None:
            groups, saved_groups = self.param_groups, state_dict["param_groups"]
            if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"])
                                                       for g, s in zip(groups, saved_groups)):
                raise ValueError("optimizer state does not match the parameters (another adapter layout?)")
            id_map = {saved: p for g, s in zip(groups, saved_groups) for saved, p in zip(s["params"], g["params"])}
            self.state.clear()
            for key, saved in state_dict["state"].items():
                param = id_map[key]
                self.state[param] = self._internal(param, saved)
            for group, saved in zip(groups, saved_groups):
                group.update({k: v for k, v in saved.items() if k != "params"})

        def _internal(self, param, saved) -> dict:
            device = _local(param).device
            get = lambda key: _local(saved[key]).to(device).contiguous()  # noqa: E731
            state = {"step": int(float(saved["step"]))}
            if "state1" in saved:  # 8-bit
                state.update(state1=get("state1"), state2=get("state2"), absmax1=get("absmax1").float(),
                             absmax2=get("absmax2").float(), qmap1=self.name2qmap["dynamic"].to(device),
                             qmap2=self.name2qmap["udynamic"].to(device))
            else:
                state.update(state1=get("exp_avg").float(), state2=get("exp_avg_sq").float())
            return state

    return _ShardedBnbAdamW


_SHARDED_BNB_CLASS = None


def ShardedBnbAdamW(params, **kwargs):  # noqa: N802 (a class factory: bitsandbytes is imported lazily)
    global _SHARDED_BNB_CLASS
    if _SHARDED_BNB_CLASS is None:
        _SHARDED_BNB_CLASS = _make_sharded_bnb_class()
    return _SHARDED_BNB_CLASS(params, **kwargs)


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
