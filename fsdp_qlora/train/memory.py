"""Memory options applied to the model: activation checkpointing and offloading, FSDP2 CPU offload.

Activation checkpointing and offloading wrap the *forward* of each decoder layer in place
(an instance attribute), so the module tree and every parameter name stay as Hugging Face
names them: the loader, checkpoints and the PEFT export see the same model with or without
them. FSDP2's hooks run around the module call, outside the wrapped forward, which is the
documented order (checkpoint inside the FSDP unit): a recomputation in backward finds the
layer's parameters all-gathered by FSDP2's pre-backward hook.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.errors import ConfigError

PAGED_OPTIMIZERS = ("paged_adamw", "paged_adamw8bit")


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """Fail fast, before any weight loads, on options this device cannot run."""
    if device.type == "cuda":
        return
    if cfg.cpu_offload:
        raise ConfigError("--cpu-offload needs a CUDA device: FSDP2 keeps parameters, gradients and optimizer "
                          "state in pinned host memory and copies them to the GPU for compute; without a GPU "
                          "everything already lives in host memory, so drop --cpu-offload")
    if cfg.optimizer in PAGED_OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer} needs a CUDA device (paged optimizer state lives in CUDA "
                          "unified memory, evicted to host under GPU memory pressure): use --optimizer "
                          f"{cfg.optimizer.removeprefix('paged_')} without a GPU")


def checkpointed_layer_indices(num_layers: int, every: int) -> list[int]:
    """Layers 0, N, 2N, ... (every=1: all of them)."""
    return list(range(0, num_layers, every))


def apply_activation_memory_options(layers: nn.ModuleList, cfg: TrainConfig) -> list[int]:
    """Checkpoint (non-reentrant) every `activation_checkpointing_every`-th layer; with
    --activation-offload, what each layer keeps for backward goes to host memory.

    A checkpointed layer keeps only its input (the layer boundary, ``batch x seq x hidden``);
    with offloading that input moves to the host too (`torch.utils.checkpoint` saves it through
    the saved-tensor hooks that are active around the call, so `_offloaded` outside the
    checkpoint catches exactly the boundary, while the checkpoint's own inner hooks drop
    everything inside the layer). The other layers offload every tensor they save. So
    `--activation-checkpointing --activation-offload` leaves on the device only the layer being
    recomputed: for a 70B model at context 2048 that is the difference between ~2.5 GiB of
    boundaries per GPU and a few MiB. Returns the checkpointed indices."""
    chosen = (checkpointed_layer_indices(len(layers), cfg.activation_checkpointing_every)
              if cfg.activation_checkpointing else [])
    for index, layer in enumerate(layers):
        forward = _checkpointed(layer.forward) if index in chosen else layer.forward
        if cfg.activation_offload:
            forward = _offloaded(forward)
        if index in chosen or cfg.activation_offload:
            layer.forward = forward
    return chosen


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # preserve_rng_state (the default) replays LoRA dropout's masks exactly in the recomputation.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _offloaded(forward):
    """Tensors saved for backward inside the layer go to host memory (pinned on CUDA) and come back
    when backward needs them (on CPU a copy in the same memory: the code path, not a saving)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    return run


def fsdp_offload_policy(cfg: TrainConfig):
    """FSDP2's CPUOffloadPolicy for --cpu-offload (sharded params, grads and optimizer state on
    the host; the optimizer step runs on the CPU), else None."""
    if not cfg.cpu_offload:
        return None
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=True)


def fsdp_options(cfg: TrainConfig) -> dict:
    """Extra `fully_shard` arguments for the decoder layers."""
    options = {"reshard_after_forward": cfg.reshard_after_forward}
    policy = fsdp_offload_policy(cfg)
    if policy is not None:
        options["offload_policy"] = policy
    return options
