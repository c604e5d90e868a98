"""Choosing memory options that fit, and reporting a plan (train.py --plan, tools/plan_memory.py,
the fit warning before a GPU run); the estimate itself is train/planner.py."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fsdp_qlora.train.planner import (
    FRAGMENTATION,
    GIB,
    SPEED_CANDIDATES,
    Options,
    Plan,
    choose_speed_options,
    gpu_bytes_for,
    load_model_config,
    plan_memory,
)

# ---- choosing options --------------------------------------------------------------------------
# (overrides, relative step time): ordered by slowdown, the first that fits is the cheapest.
CANDIDATES: list[tuple[dict[str, Any], float]] = [
    ({"reshard_after_forward": False}, 0.95),
    ({}, 1.0),
    ({"optimizer": "adamw8bit"}, 1.01),
    ({"activation_checkpointing": True, "activation_checkpointing_every": 2}, 1.17),
    ({"activation_checkpointing": True, "activation_checkpointing_every": 2, "activation_offload": True}, 1.25),
    ({"activation_checkpointing": True}, 1.33),
    ({"activation_checkpointing": True, "optimizer": "adamw8bit", "loss_chunk_tokens": 256}, 1.34),
    # boundaries to pinned host memory: one batch x seq x hidden copy each way per layer, overlapped
    # with little else on a 70B layer's compute, so a few percent more than checkpointing alone
    ({"activation_checkpointing": True, "activation_offload": True}, 1.38),
    ({"activation_checkpointing": True, "activation_offload": True, "optimizer": "adamw8bit",
      "loss_chunk_tokens": 256}, 1.39),
    ({"activation_checkpointing": True, "cpu_offload": True}, 1.6),
    ({"activation_checkpointing": True, "cpu_offload": True, "loss_chunk_tokens": 256}, 1.62),
]


# Replicating the whole NF4 base on every GPU skips every all-gather (the reference recipe found
# it faster than sharding whenever the model fits): with several ranks, each option set is also
# tried under --sharding ddp at this factor (not with CPU offload: N full copies in host memory).
REPLICATED_SPEEDUP = 0.85


def auto_plan(config: dict[str, Any], base: Options, gpu_bytes: int) -> tuple[Plan | None, float]:
    candidates = list(CANDIDATES)
    if base.world_size > 1:
        candidates += [({**overrides, "sharding": "ddp", "world_size": 1}, slowdown * REPLICATED_SPEEDUP)
                       for overrides, slowdown in CANDIDATES if not overrides.get("cpu_offload")]
    for overrides, slowdown in sorted(candidates, key=lambda candidate: candidate[1]):
        plan = plan_memory(config, base.replace(**overrides))
        if plan.fits(gpu_bytes):
            return plan, slowdown
    return None, math.inf


def describe_options(opt: Options) -> str:
    flags = [f"--optimizer {opt.optimizer}", f"--loss-chunk-tokens {opt.loss_chunk_tokens}"]
    if opt.sharding == "ddp":
        flags.insert(0, "--sharding ddp")
    if opt.activation_checkpointing:
        flags.append("--activation-checkpointing")
        if opt.activation_checkpointing_every != 1:
            flags.append(f"--activation-checkpointing-every {opt.activation_checkpointing_every}")
    if opt.activation_offload:
        flags.append("--activation-offload")
    if opt.cpu_offload:
        flags.append("--cpu-offload")
    if not opt.reshard_after_forward:
        flags.append("--no-reshard-after-forward")
    if opt.fsdp_units != "auto":  # decided (plan_memory decides auto); shown so that the line can be reused
        flags.append(f"--fsdp-units {opt.fsdp_units}")
    if opt.dequantize_once is not None and opt.quantized:
        flags.append("--dequantize-once" if opt.dequantize_once else "--no-dequantize-once")
    return " ".join(flags)


def format_plan(plan: Plan, gpu_bytes: int, title: str = "") -> str:
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    o = plan.options
    lines = [title or "memory plan",
             f"  world size {o.world_size}, context {o.context_length}, batch {o.batch_size}, LoRA r={o.lora_rank}",
             f"  options: {describe_options(o)}", "  per GPU:"]
    lines += [f"    {name:<18}{gib(value)}" for name, value in plan.parts.items()]
    lines.append(f"    {'= peak allocated':<18}{gib(plan.peak)}")
    lines.append(f"    {'+ overhead':<18}{gib(plan.needed() - plan.peak)}  (CUDA context, workspaces, "
                 f"{FRAGMENTATION:.0%} fragmentation)")
    verdict = "fits" if plan.fits(gpu_bytes) else "does NOT fit"
    lines.append(f"    {'= needed':<18}{gib(plan.needed())}  -> {verdict} in {gpu_bytes / GIB:.1f} GiB")
    if plan.host:
        lines.append("  host memory per rank: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan.host.items()))
    return "\n".join(lines)


def advice(config: dict[str, Any], opt: Options, gpu_bytes: int) -> str:
    plan, _ = auto_plan(config, opt, gpu_bytes)
    if plan is None:
        return "no combination of options fits: use more GPUs (--world-size) or a shorter --context-length/--batch-size"
    return f"try: {describe_options(plan.options)} (predicted {plan.needed() / GIB:.1f} GiB per GPU)"


def replication_fits(cfg, config: dict[str, Any], world_size: int, gpu_bytes: int) -> bool:
    """--sharding auto on several ranks: whether the plan of ``--sharding ddp`` (every rank holding the
    whole model) fits `gpu_bytes`. Replication skips every all-gather: on 2 CPU ranks it ran 1.04-1.13x
    the FSDP2 layout's tokens/s (docs/benchmarks.md). Not with --cpu-offload (FSDP2's, for sharded
    weights) or explicit --replicate-groups; False for an architecture the planner does not model."""
    if cfg.sharding != "auto" or world_size < 2 or cfg.replicate_groups or cfg.cpu_offload:
        return False
    try:
        return plan_memory(config, Options(cfg, 1, "ddp")).fits(gpu_bytes)
    except (KeyError, ValueError):
        return False


def auto_replicates(cfg, model_dir, world_size: int, device) -> bool:
    """`replication_fits` for a run on `device`: on its GPU's memory (or --gpu-memory-gib); a CPU run
    plans for no GPU (as the fit warning) and keeps FSDP2 unless --gpu-memory-gib is given."""
    if cfg.sharding != "auto" or not _plans_for_gpu(cfg, device):
        return False
    try:
        config = load_model_config(str(model_dir))
    except (ValueError, OSError):
        return False
    return replication_fits(cfg, config, world_size, gpu_bytes_for(cfg.gpu_memory_gib, device))


def plan_train_config(cfg, world_size: int, nodes: int | None = None) -> tuple[dict[str, Any], Plan]:
    """(model config, plan) of a TrainConfig on `world_size` ranks over `nodes` (None: from the
    environment, as in a launch). Under HSDP a parameter is sharded over one node's ranks only,
    so that is the planner's world; `plan.options.sharding` is the resolved layout (auto: ddp when
    the whole model fits the GPU, `replication_fits`)."""
    from fsdp_qlora.distributed.sharding import resolve_layout

    environ = None if nodes is None else {"LOCAL_WORLD_SIZE": str(max(1, world_size // nodes))}
    config = load_model_config(cfg.model)
    fits = replication_fits(cfg, config, world_size, gpu_bytes_for(cfg.gpu_memory_gib))
    layout = resolve_layout(cfg.sharding, world_size, cfg.replicate_groups, environ, fits)
    opt = Options(cfg, layout.shard, layout.strategy)
    return config, plan_memory(config, opt)


def report_plan(cfg, world_size: int, nodes: int | None = None, auto: bool = False) -> int:
    """Print the plan for a TrainConfig on `world_size` ranks (`train.py --plan`, tools/plan_memory.py);
    with `auto`, also the cheapest options that fit. Returns an exit code (1: nothing fits)."""
    config, plan = plan_train_config(cfg, world_size, nodes)
    opt, gpu = plan.options, gpu_bytes_for(cfg.gpu_memory_gib)
    print(format_plan(plan, gpu, f"memory plan for {cfg.model} ({opt.sharding}, {world_size} ranks)"))
    if auto:
        best, slowdown = auto_plan(config, opt, gpu)
        if best is None:
            print("auto: " + advice(config, opt, gpu))
            return 1
        print(format_plan(best, gpu, f"auto: cheapest fitting options (~{slowdown:.2f}x step time)"))
    elif not plan.fits(gpu):
        print("  " + advice(config, opt, gpu))
    return 0


def resolve_speed_options(cfg, model_dir, shard_ranks: int, device):
    """A copy of the TrainConfig with --fsdp-units auto and an unset --dequantize-once decided for this
    run by the memory plan (`planner.choose_speed_options`, on the GPU's memory or --gpu-memory-gib);
    for an architecture the planner does not model, the memory-frugal settings (per-layer units,
    dequantizing twice)."""
    if cfg.fsdp_units != "auto" and cfg.dequantize_once is not None:
        return cfg
    try:
        config = load_model_config(str(model_dir))
        chosen = choose_speed_options(config, Options(cfg, shard_ranks), gpu_bytes_for(cfg.gpu_memory_gib, device))
        units, once = chosen.fsdp_units, chosen.dequantize_once
    except (KeyError, ValueError, OSError):
        units, once = SPEED_CANDIDATES[-1]
    return dataclasses.replace(cfg, fsdp_units=units if cfg.fsdp_units == "auto" else cfg.fsdp_units,
                               dequantize_once=once if cfg.dequantize_once is None else cfg.dequantize_once)


def _plans_for_gpu(cfg, device) -> bool:
    """Whether a run on `device` has GPU memory to plan for: a GPU's, or --gpu-memory-gib's (a CPU run
    has none unless the flag gives it one)."""
    return getattr(device, "type", None) == "cuda" or cfg.gpu_memory_gib > 0


def warn_if_plan_does_not_fit(cfg, model_dir, shard_ranks: int, device) -> None:
    """Before loading weights on a GPU: warn, with the plan's advice, when the settings won't fit.
    `shard_ranks`: the ranks one parameter is split over (the mesh's dp_shard size)."""
    if not _plans_for_gpu(cfg, device):
        return
    try:
        config = load_model_config(str(model_dir))
        opt = Options(cfg, shard_ranks)
        gpu = gpu_bytes_for(cfg.gpu_memory_gib, device)
        plan = plan_memory(config, opt)
    except (KeyError, ValueError, OSError) as err:  # an architecture the planner does not model
        print(f"warning: no memory plan for this model ({type(err).__name__}: {err})", flush=True)
        return
    if not plan.fits(gpu):
        print(f"warning: these settings need about {plan.needed() / GIB:.1f} GiB per GPU, more than the "
              f"{gpu / GIB:.1f} GiB available; {advice(config, opt, gpu)} (details: train.py --plan)", flush=True)
