"""Per-GPU memory planner: from a model config alone (no weights), the memory one rank needs.

    python tools/plan_memory.py --model llama-70b --world-size 2 --context-length 2048 --batch-size 1
    python train.py --plan ...            # the same, with train.py's flags
    python tools/plan_memory.py ... --auto    # the cheapest options (least slowdown) that fit

This module estimates (`plan_memory`); choosing options that fit and reporting the plan is
train/plan_advice.py.

Two kinds of figures:

* **Static, exact**: the bytes this rank holds for its NF4 weight shard (4-bit codes + quantization
  constants, computed exactly as `NF4Tensor` stores them), the other frozen weights (bf16
  embeddings, lm_head, norms), the fp32 LoRA parameters, their gradients and the optimizer state.
  tests/test_planner.py checks them against a real sharded model on several configs and world sizes.
* **Dynamic, modelled**: all-gathered layer buffers (current + prefetched layer, plus the bf16
  weight dequantized for one matmul), the root's all-gathered lm_head (FSDP2 keeps the
  root unsharded from forward to the end of backward), activations per token and layer (bf16
  compute, Flash/memory-efficient attention on CUDA: no T x T scores), and the loss' logits. The
  per-token activation count is derived below from what autograd saves in a LoRA'd Llama layer.

The fit check adds a runtime overhead (CUDA context, cuBLAS/NCCL workspaces) and 5% allocator
fragmentation to the predicted peak of `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdp_qlora.config import QUANTIZED_TRAIN_TYPES, TrainConfig
from fsdp_qlora.layout import NESTED_BLOCKSIZE, NF4_BLOCKSIZE, OPTIMIZER_BLOCKSIZE, row_chunk
from fsdp_qlora.model.registry import MODELS, alias_config
from fsdp_qlora.peft.spec import AdapterSpec

GIB = 2**30
RUNTIME_OVERHEAD = int(0.75 * GIB)  # CUDA context + cuBLAS workspace + NCCL buffers (not in max_memory_allocated)
FRAGMENTATION = 0.05
# Per logit of one loss chunk at its backward: fp32 log-softmax (kept by cross-entropy), its fp32
# gradient, and the bf16 logits and their gradient (the fp32 upcast is freed once log-softmax ran).
LOGIT_BYTES = 4 + 4 + 2 + 2

# config.json values of the aliases (Hugging Face's published configs): model/registry.py.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {alias: spec.config for alias, spec in MODELS.items() if spec.config}


def load_model_config(model: str) -> dict[str, Any]:
    """An alias the planner knows, a config.json, or a directory holding one. Never downloads."""
    if model == "tiny-llama":
        from fsdp_qlora.model.tiny_llama import TINY_LLAMA_CONFIG

        return dict(TINY_LLAMA_CONFIG)
    known = alias_config(model)
    if known is not None:
        return known
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from fsdp_qlora.errors import ConfigError

    raise ConfigError(f"the planner has no config for {model!r}: pass one of {', '.join(sorted(KNOWN_CONFIGS))}, "
                      "tiny-llama, or a config.json (or a directory holding one)")


@dataclass
class Geometry:
    """Sizes from config.json for the activation model, and the exact parameter shapes of the
    architecture (its linears, norms, embeddings) from transformers' class (model/structure.py)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layer_linears: dict[str, tuple[int, int]]  # one decoder layer: name in the layer -> (out, in)
    layer_biases: dict[str, int]
    layer_frozen: tuple[tuple[int, ...], ...]  # norms (and q/k norms) of one layer
    root_frozen: tuple[tuple[int, ...], ...]  # embeddings, final norm, lm_head (once when tied)
    layer_prefix: str = "model.layers.0."  # the first layer's qualified name, for target rules

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Geometry":
        from fsdp_qlora.model.structure import model_shapes  # torch + transformers: only when planning

        shapes = model_shapes(config)
        heads = config["num_attention_heads"]
        return cls(config["hidden_size"], config["intermediate_size"], shapes.layers, heads,
                   config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, config["vocab_size"],
                   shapes.tied, shapes.linears, shapes.biases, shapes.layer_frozen, shapes.root_frozen,
                   shapes.layer_prefix)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of one decoder layer's linears, by their name in the layer."""
        return self.layer_linears

    def targets(self, target_modules: tuple[str, ...] | list[str] | str) -> list[str]:
        """The names of one layer's linears that get adapters: the loader's rule (peft/targets.py)
        on the qualified names, a regex (a str) included."""
        from fsdp_qlora.peft.targets import select_targets

        qualified = [self.layer_prefix + name for name in self.layer_linears]
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        return [name.removeprefix(self.layer_prefix) for name in select_targets(qualified, qualified, targets)]


def nf4_shard_bytes(out_features: int, in_features: int, world: int) -> tuple[int, int]:
    """(4-bit codes, quantization constants) of one rank's NF4 shard, as NF4Tensor holds them."""
    n = row_chunk(out_features, world) * in_features
    blocks = n // NF4_BLOCKSIZE
    whole_blocks = out_features * in_features // NF4_BLOCKSIZE  # nested absmax and offset: the whole weight's
    return n // 2, blocks + 4 * math.ceil(whole_blocks / NESTED_BLOCKSIZE) + 4  # absmax_q u8, nested fp32, offset fp32


@dataclass(frozen=True)
class Options:
    """A run's settings (`TrainConfig`) seen by one rank: the planner reads its fields through this
    (``opt.context_length``), with the ranks one parameter is sharded over and the layout."""

    cfg: TrainConfig
    world_size: int  # ranks one parameter is sharded over (1 under --sharding ddp)
    sharding: str = "fsdp"  # as --sharding; only "ddp" changes what the planner prints

    def __getattr__(self, name: str) -> Any:
        if name == "cfg":  # not set yet (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self.cfg, name)

    @classmethod
    def of(cls, world_size: int, sharding: str = "fsdp", **settings: Any) -> "Options":
        """Options from TrainConfig fields given by name (the rest: TrainConfig's defaults)."""
        return cls(TrainConfig(**settings), world_size, sharding)

    def replace(self, **changes: Any) -> "Options":
        """Another option set: `world_size` / `sharding` and any TrainConfig field."""
        own = {k: changes.pop(k) for k in ("world_size", "sharding") if k in changes}
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, **changes), **own)

    @property
    def adapter(self) -> AdapterSpec:
        return AdapterSpec.from_config(self.cfg)

    @property
    def quantized(self) -> bool:
        """An NF4 base (qlora/qdora); lora/dora keep the base in bf16."""
        return self.cfg.train_type in QUANTIZED_TRAIN_TYPES


@dataclass
class Plan:
    parts: dict[str, int]  # bytes on the GPU at the peak, by part
    host: dict[str, int]  # bytes in host memory per rank (CPU offload / activation offload)
    peak: int  # predicted torch.cuda.max_memory_allocated
    options: Options

    def needed(self) -> int:
        return int(self.peak * (1 + FRAGMENTATION)) + RUNTIME_OVERHEAD

    def fits(self, gpu_bytes: int) -> bool:
        return self.needed() <= gpu_bytes


def static_bytes(geo: Geometry, opt: Options) -> dict[str, int]:
    """Exact bytes one rank (rank 0, the largest shard) holds for weights, adapters and optimizer."""
    w, r = opt.world_size, opt.adapter.r
    quantized = opt.quantized
    codes = constants = dense_linears = 0
    for out_f, in_f in geo.linears().values():
        if quantized:
            c, q = nf4_shard_bytes(out_f, in_f, w)
            codes, constants = codes + c, constants + q
        else:  # lora/dora: the frozen base linears stay bf16
            dense_linears += row_chunk(out_f, w) * in_f * 2
    frozen = sum(_sharded_elements(shape, w) * 2 for shape in geo.root_frozen)  # embeddings, lm_head, final norm
    layer_frozen = sum(_sharded_elements(shape, w) * 2 for shape in geo.layer_frozen)  # norms
    layer_frozen += sum(row_chunk(out_f, w) * 2 for out_f in geo.layer_biases.values())  # linear biases (bf16)
    adapter_elems, optimizer = 0, 0
    targets = geo.targets(opt.adapter.target_modules)
    shapes = [(r, geo.linears()[n][1]) for n in targets]  # lora_A (r, in)
    shapes += [(geo.linears()[n][0], r) for n in targets]  # lora_B (out, r)
    if opt.adapter.use_dora:
        shapes += [(geo.linears()[n][0],) for n in targets]  # lora_magnitude_vector
    for shape in shapes:
        rows, cols = shape[0], math.prod(shape[1:])
        local = row_chunk(rows, w) * cols
        adapter_elems += local
        optimizer += _optimizer_bytes(shape, local, opt)
    return {
        "nf4_weights": codes * geo.layers,
        "quant_constants": constants * geo.layers,
        "frozen_bf16": frozen + (dense_linears + layer_frozen) * geo.layers,
        "adapter_params": adapter_elems * 4 * geo.layers,
        "adapter_grads": adapter_elems * 4 * geo.layers,
        "optimizer_state": optimizer * geo.layers,
    }


def _sharded_elements(shape: tuple[int, ...], world: int) -> int:
    """Rank 0's elements of a parameter FSDP2 splits by rows (torch.chunk)."""
    return row_chunk(shape[0], world) * math.prod(shape[1:]) if shape else 1


def _optimizer_bytes(shape: tuple[int, ...], local: int, opt: Options) -> int:
    if opt.optimizer == "adamw":
        return 8 * local + 4  # exp_avg + exp_avg_sq fp32, step (fp32 scalar)
    from fsdp_qlora.train.optim import blocks_align

    if opt.optimizer.endswith("8bit") and math.prod(shape) >= opt.min_8bit_size and blocks_align(shape, opt.world_size):
        return 2 * local + 8 * math.ceil(local / OPTIMIZER_BLOCKSIZE)  # uint8 codes x2, fp32 absmax x2 per 256
    return 8 * local


def activation_bytes_per_token_layer(geo: Geometry, opt: Options) -> int:
    """Bytes autograd keeps per token for one LoRA'd decoder layer (bf16 compute, fp32 norms).

    RMSNorm x2: fp32 input + bf16 output (6H each); attention: q, k, v before and after rotary and
    the attention output (~6H + 6H_kv with flash attention, plus its fp32 logsumexp); MLP: gate,
    up, SiLU(gate) and their product (8I); LoRA: each adapter's bf16 input after dropout plus the
    dropout mask (3 bytes per input feature; shared inputs count once when there is no dropout),
    and its rank-r intermediate; DoRA: also each adapted linear's bf16 base output and adapter
    output, which the fp32 `scale * ...` products keep for their gradients (2 + 2 bytes per output
    feature). Found by tests/test_planner.py's tracked peaks: 2 bytes undercounted DoRA by ~20%.
    """
    h, kv, i = geo.hidden, geo.kv_heads * geo.head_dim, geo.intermediate
    total = 12 * h + 6 * h + 6 * kv + 4 * geo.heads + 8 * i
    targets = geo.targets(opt.adapter.target_modules)
    if opt.adapter.dropout > 0:
        total += sum(3 * geo.linears()[n][1] + 2 * opt.adapter.r for n in targets)
    else:
        total += 2 * opt.adapter.r * len(targets)
    if opt.adapter.use_dora:
        total += sum(4 * geo.linears()[n][0] for n in targets)
    return total


def dora_temporary_bytes_per_token(geo: Geometry, opt: Options) -> int:
    """DoRA's fp32 (tokens x out) working tensors for the linear being computed: the magnitude
    ratio times the base and adapter outputs in forward, their gradients in backward (~2 alive)."""
    if not opt.adapter.use_dora:
        return 0
    return 8 * max(geo.linears()[n][0] for n in geo.targets(opt.adapter.target_modules))


def plan_memory(config: dict[str, Any], opt: Options) -> Plan:
    geo = Geometry.from_config(config)
    static = static_bytes(geo, opt)
    tokens = opt.batch_size * opt.context_length
    w = opt.world_size
    if opt.quantized:
        layer_full = sum(sum(nf4_shard_bytes(o, i, 1)) for o, i in geo.linears().values())  # one gathered layer
        biggest_bf16 = max(o * i for o, i in geo.linears().values()) * 2  # one weight dequantized per matmul
    else:  # bf16 base: gathered as is, nothing to dequantize
        layer_full, biggest_bf16 = sum(o * i * 2 for o, i in geo.linears().values()), 0
    layer_adapter = sum((geo.linears()[n][1] + geo.linears()[n][0]) * opt.adapter.r
                        for n in geo.targets(opt.adapter.target_modules))
    gathered_layers = 2 if opt.reshard_after_forward else geo.layers + 1  # current + prefetched (or all)
    parts: dict[str, int] = {}
    host: dict[str, int] = {}
    resident = ("nf4_weights", "quant_constants", "frozen_bf16", "adapter_params", "adapter_grads", "optimizer_state")
    for key in resident:
        if opt.cpu_offload:
            host[key] = static[key]
        else:
            parts[key] = static[key]
    if opt.cpu_offload:  # the root's own shard (embeddings...) is also copied to the GPU when gathered
        parts["offload_staging"] = layer_full // w
    parts["layer_buffers"] = (gathered_layers * (layer_full + layer_adapter * 2)  # base + bf16 adapters
                              + biggest_bf16
                              + layer_adapter * 4)  # one layer's unsharded fp32 adapter grads
    # The root (lm_head + final norm; the embedding too when tied) stays gathered from forward to
    # the end of backward. Untied embeddings are their own unit, gathered only around the lookup.
    vocab_matrix = geo.vocab * geo.hidden * 2  # one bf16 embedding or lm_head weight
    parts["root_unsharded"] = vocab_matrix + geo.hidden * 2
    embeddings_gathered = 0 if geo.tied else vocab_matrix
    per_layer = activation_bytes_per_token_layer(geo, opt)
    boundary = 2 * geo.hidden  # a checkpointed layer keeps only its bf16 input
    checkpointed = (len(range(0, geo.layers, opt.activation_checkpointing_every))
                    if opt.activation_checkpointing else 0)
    plain = geo.layers - checkpointed
    # offloaded (train/memory.py): boundaries and saved tensors in host memory, two layers in flight
    on_gpu_plain = min(plain, 2) if opt.activation_offload else plain
    on_gpu_boundaries = min(checkpointed, 2) if opt.activation_offload else checkpointed
    saved = tokens * (on_gpu_boundaries * boundary + on_gpu_plain * per_layer)
    # A layer's backward: its recomputed activations (when checkpointed), the gradients in flight
    # through it (bf16 grads of the MLP's gate, up, activation and product, 4 x 2I, and of the
    # attention output and residual stream, 3 x 2H) and DoRA's fp32 products.
    layer_backward = 8 * geo.intermediate + 6 * geo.hidden + dora_temporary_bytes_per_token(geo, opt)
    layer_moment = tokens * ((per_layer if checkpointed else 0) + layer_backward)
    chunk = min(opt.loss_chunk_tokens or tokens, tokens)
    loss_moment = chunk * geo.vocab * LOGIT_BYTES
    # Backward first runs the loss (one chunk's logits alive), then the layers (one recomputed
    # at a time): two moments, the peak holds the larger of the two on top of what is saved.
    parts["activations"] = saved + (layer_moment if layer_moment >= loss_moment else 0)
    if opt.activation_offload:
        host["activations"] = tokens * ((plain - on_gpu_plain) * per_layer
                                        + (checkpointed - on_gpu_boundaries) * boundary)
    parts["logits_and_loss"] = tokens * 2 * geo.hidden + (loss_moment if loss_moment > layer_moment else 0)  # + final hidden states
    # The other candidate peak, at the start of forward: the gathered embeddings (freed after the
    # lookup) while the first layer is gathered, before any activation exists. With a large
    # vocabulary and little activation memory (Llama-3, short context) it can be the higher one.
    forward_start = embeddings_gathered + layer_full + layer_adapter * 2 + tokens * 2 * geo.hidden  # + their output
    step_peak = parts["layer_buffers"] + parts["activations"] + parts["logits_and_loss"]
    if forward_start > step_peak:
        parts.update(layer_buffers=0, activations=0, logits_and_loss=0, embeddings_at_forward_start=forward_start)
    return Plan(parts, host, sum(parts.values()), opt)
