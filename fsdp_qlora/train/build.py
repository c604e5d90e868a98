"""Assemble the training model: transformers' class on meta, NF4 base, adapters, memory options,
FSDP2 sharding, then the weights (each rank its rows), then DoRA's magnitudes.

    check_model(model_dir, cfg)                     # from config.json alone, before data or weights
    model = build_qlora_model(model_dir, cfg, env, mesh)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoConfig

from fsdp_qlora.config import QUANTIZED_TRAIN_TYPES, TrainConfig
from fsdp_qlora.distributed.env import DistEnv
from fsdp_qlora.distributed.sharding import frozen_replication, shard_model, shard_size
from fsdp_qlora.model.loader import (
    STORAGE_DTYPE,
    checkpoint_layout_of,
    load_base_weights,
    materialize_computed_buffers,
    quantize_decoder_linears,
)
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.model.structure import decoder_layers, meta_model
from fsdp_qlora.model.synthetic import fill_synthetic_weights
from fsdp_qlora.peft.apply import ADAPTER_LAYERS, apply_lora, compute_adapters_in, init_lora_parameters
from fsdp_qlora.peft.dora import init_dora_magnitudes
from fsdp_qlora.peft.spec import AdapterSpec
from fsdp_qlora.peft.targets import count_by_name
from fsdp_qlora.train.compile import compile_layers
from fsdp_qlora.train.memory import apply_activation_memory_options, fsdp_options
from fsdp_qlora.train.plan_advice import resolve_speed_options
from fsdp_qlora.train.precision import resolve_compute_dtype


def check_model(model_dir: Path, cfg: TrainConfig) -> None:
    """What can be refused from config.json and the checkpoint's headers, before data or weights: an
    architecture the loader cannot handle, adapter targets that match nothing, experts the checkpoint
    does not hold as config.json says. Builds the model on meta (no memory)."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    model = meta_model(config, STORAGE_DTYPE, cfg.trust_remote_code)
    apply_lora(model, AdapterSpec.from_config(cfg))  # on meta: only the target checks cost anything
    if cfg.synthetic_weights:
        _synthetic_note(cfg)
    else:  # a synthetic base has no checkpoint whose layout could disagree
        checkpoint_layout_of(model, model_dir)


def build_qlora_model(model_dir: Path, cfg: TrainConfig, env: DistEnv, mesh) -> nn.Module:
    cfg = resolve_speed_options(cfg, model_dir, shard_size(mesh), env.device)  # --fsdp-units auto, --dequantize-once
    if env.is_main:
        print(f"fsdp units: {cfg.fsdp_units}, dequantize {'once' if cfg.dequantize_once else 'twice'} per step",
              flush=True)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    model = meta_model(config, STORAGE_DTYPE, cfg.trust_remote_code)  # refuses what cannot load, in one line
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, env.device)
    materialize_computed_buffers(model, env.device, compute_dtype)  # rotary frequencies, embedding scales
    if cfg.train_type in QUANTIZED_TRAIN_TYPES:  # lora/dora: the base stays frozen bf16 nn.Linears, loaded by rows
        quantize_decoder_linears(model, shard_count=shard_size(mesh))  # the dp_shard ranks (1 for ddp)
        for module in model.modules():
            if isinstance(module, NF4Linear):
                module.dequantize_once = cfg.dequantize_once
    adapted = apply_lora(model, AdapterSpec.from_config(cfg))
    if env.is_main:
        print(f"adapters on {len(adapted)} modules: {count_by_name(adapted)}", flush=True)
    _materialize_adapters(model, env.device, cfg.seed)
    if cfg.compile:
        compile_layers(decoder_layers(model))  # inside the memory options' wrappers (train/compile.py)
    apply_activation_memory_options(decoder_layers(model), cfg)  # checkpointing / offload (train/memory.py)
    shard_model(model, mesh, param_dtype=compute_dtype, fsdp_options=fsdp_options(cfg),
                per_layer_units=cfg.fsdp_units == "layer",
                replicate_frozen=frozen_replication(shard_size(mesh), cfg.fsdp_units == "layer", cfg.cpu_offload))
    if not isinstance(model, FSDPModule):  # --sharding ddp: no mixed-precision policy casts the adapters
        compute_adapters_in(model, compute_dtype)
    if cfg.synthetic_weights:  # seeded random rows, drawn and quantized on each rank (model/synthetic.py)
        fill_synthetic_weights(model, env.device, cfg.seed, compute_dtype)
    else:
        load_base_weights(model, model_dir, env.device, cfg.load_workers, compute_dtype)
    init_dora_magnitudes(model)  # DoRA's m = row norms of the loaded base; each rank its own rows
    return model


def _synthetic_note(cfg: TrainConfig) -> None:
    """Say once (rank 0) what a synthetic run's figures mean, before anything loads."""
    if os.environ.get("RANK", "0") != "0":
        return
    rows = ("" if cfg.packing or cfg.dataset == "synthetic" else "; rows are the data's own lengths: use "
            "--dataset synthetic (or --packing) for rows that fill --context-length, as a real run's memory at "
            "that context needs")
    print(f"synthetic weights (seed {cfg.seed}): memory and speed are a real run's, the loss means nothing{rows}",
          flush=True)


def _materialize_adapters(model: nn.Module, device: torch.device, seed: int) -> None:
    """Adapters are tiny: build them in full on every rank from the same seed; FSDP2 then
    keeps each rank's chunk. Every rank thus starts from identical adapter weights."""
    for module in model.modules():
        if isinstance(module, ADAPTER_LAYERS):
            module.materialize(device)
    init_lora_parameters(model, seed)
