"""Per-GPU memory planner: from a model config alone (no weights), the memory one rank needs.

    python tools/plan_memory.py --model llama-70b --world-size 2 --context-length 2048 --batch-size 1
    python train.py --plan ...            # the same, with train.py's flags
    python tools/plan_memory.py ... --auto    # the cheapest options (least slowdown) that fit

This module estimates (`plan_memory`); choosing options that fit and reporting the plan is
train/plan_advice.py.

Two kinds of figures:

* **Static, exact**: the bytes this rank holds for its NF4 weight shard (4-bit codes + quantization
  constants, computed exactly as `NF4Tensor` and `NF4Experts` store them: a mixture of experts' rank
  holds whole experts), the other frozen weights (bf16 embeddings, lm_head, norms, routers), the fp32
  LoRA parameters (expert adapters in PEFT's layout), their gradients and the optimizer state.
  tests/test_planner.py checks them against a real sharded model on several configs and world sizes.
* **Dynamic, modelled**: all-gathered layer buffers (current + prefetched layer, plus the bf16
  weight dequantized for one matmul), the root's all-gathered lm_head (FSDP2 keeps the
  root unsharded from forward to the end of backward), activations per token and layer (bf16
  compute, Flash/memory-efficient attention on CUDA: no T x T scores), and the loss' logits. The
  per-token activation count is derived below from what autograd saves in a LoRA'd Llama layer,
  plus, in a mixture-of-experts layer, each token's top-k experts and its router.

The fit check adds a runtime overhead (CUDA context, cuBLAS/NCCL workspaces) and 5% allocator
fragmentation to the predicted peak of `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsdp_qlora.config import QUANTIZED_TRAIN_TYPES, TrainConfig
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.layout import NESTED_BLOCKSIZE, NF4_BLOCKSIZE, OPTIMIZER_BLOCKSIZE, row_chunk
from fsdp_qlora.model.registry import MODELS, alias_config
from fsdp_qlora.peft.spec import AdapterSpec

if TYPE_CHECKING:
    from fsdp_qlora.model.structure import ModelShapes

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
    raise ConfigError(f"the planner has no config for {model!r}: pass one of {', '.join(sorted(KNOWN_CONFIGS))}, "
                      "tiny-llama, or a config.json (or a directory holding one)")


@dataclass
class Geometry:
    """Sizes from config.json for the activation model, and the exact parameter shapes of the
    architecture (its linears, norms, embeddings, experts) from transformers' class (model/structure.py)."""

    hidden: int
    intermediate: int  # a layer's dense MLP (in a mixture-of-experts layer: its shared expert's, or 0)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layer_linears: dict[str, tuple[int, int]]  # one decoder layer's NF4 linears: name in the layer -> (out, in)
    layer_biases: dict[str, int]
    layer_frozen: tuple[tuple[int, ...], ...]  # norms (and q/k norms, routers, expert biases) of one layer
    root_frozen: tuple[tuple[int, ...], ...]  # embeddings, final norm, lm_head (once when tied)
    layer_prefix: str = "model.layers.0."  # the first layer's qualified name, for target rules
    layer_routers: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # bf16 router linears
    # fused expert weights: name in the layer -> (experts, out, in), each expert as it computes
    layer_experts: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    top_k: int = 0  # experts per token

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Geometry":
        from fsdp_qlora.model.structure import model_shapes  # torch + transformers: only when planning

        shapes = model_shapes(config)
        heads = config["num_attention_heads"]
        return cls(config["hidden_size"], _dense_intermediate(config, shapes), shapes.layers, heads,
                   config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, config["vocab_size"],
                   shapes.tied, shapes.linears, shapes.biases, shapes.layer_frozen, shapes.root_frozen,
                   shapes.layer_prefix, shapes.routers, _experts_out_in(shapes), shapes.top_k)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of one decoder layer's NF4 linears, by their name in the layer."""
        return self.layer_linears

    def adaptable(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear an adapter may wrap: the NF4 ones and the (bf16) routers."""
        return {**self.layer_linears, **self.layer_routers}

    def targets(self, target_modules: tuple[str, ...] | list[str] | str) -> list[str]:
        """The names of one layer's linears that get adapters: the loader's rule (peft/targets.py)
        on the qualified names, a regex (a str) included; routers only when named (all-linear skips them)."""
        from fsdp_qlora.peft.targets import select_targets

        named = [self.layer_prefix + name for name in self.adaptable()]
        linears = [self.layer_prefix + name for name in self.layer_linears]
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        return [name.removeprefix(self.layer_prefix) for name in select_targets(named, linears, targets)]

    def expert_targets(self, adapter: AdapterSpec) -> list[str]:
        """The names of one layer's fused expert weights that get adapters (the loader's rule)."""
        from fsdp_qlora.peft.targets import select_expert_targets

        qualified = [self.layer_prefix + name for name in self.layer_experts]
        chosen = select_expert_targets(qualified, adapter.target_modules, list(adapter.target_parameters),
                                       adapter.use_dora)
        return [name.removeprefix(self.layer_prefix) for name in chosen]

    def adapter_shapes(self, adapter: AdapterSpec) -> list[tuple[int, ...]]:
        """The shapes of one layer's adapter parameters: lora_A (r, in) and lora_B (out, r) per adapted
        linear (and DoRA's magnitude (out,)); per adapted expert weight PEFT's ParamWrapper layout,
        lora_A (r * experts, in) and lora_B (out, r * experts) (peft/experts_lora.py)."""
        r, shapes = adapter.r, []
        for name in self.targets(adapter.target_modules):
            out_f, in_f = self.adaptable()[name]
            shapes += [(r, in_f), (out_f, r)] + ([(out_f,)] if adapter.use_dora else [])
        for name in self.expert_targets(adapter):
            experts, out_f, in_f = self.layer_experts[name]
            shapes += [(r * experts, in_f), (out_f, r * experts)]
        return shapes

    def expert_intermediate(self) -> int:
        """One expert's intermediate size: its down projection's in-features (0 without experts)."""
        return next((in_f for name, (_, _, in_f) in self.layer_experts.items() if name.endswith("down_proj")), 0)

    def num_experts(self) -> int:
        return next((experts for experts, _, _ in self.layer_experts.values()), 0)


def _experts_out_in(shapes: ModelShapes) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of each fused expert weight, by the adapters' rule (model/experts.py)."""
    from fsdp_qlora.model.experts import expert_in_out

    out_in = {}
    for name, shape in shapes.experts.items():
        experts, in_features, out_features = expert_in_out(shape, shapes.experts_transposed)
        out_in[name] = (experts, out_features, in_features)
    return out_in


def _dense_intermediate(config: dict[str, Any], shapes: ModelShapes) -> int:
    """The intermediate size of a layer's dense MLP, for the activation model: config.json's; in a
    mixture-of-experts layer its shared expert's (Qwen2-MoE: the linear down_proj's in-features), or
    0 (Mixtral's intermediate_size is the experts', counted by `moe_bytes_per_token`)."""
    if not shapes.experts:
        return config["intermediate_size"]
    return sum(in_f for name, (_, in_f) in shapes.linears.items() if name.endswith("down_proj"))


def nf4_shard_bytes(out_features: int, in_features: int, world: int) -> tuple[int, int]:
    """(4-bit codes, quantization constants) of one rank's NF4 shard, as NF4Tensor holds them."""
    n = row_chunk(out_features, world) * in_features
    blocks = n // NF4_BLOCKSIZE
    whole_blocks = out_features * in_features // NF4_BLOCKSIZE  # nested absmax and offset: the whole weight's
    return n // 2, blocks + 4 * math.ceil(whole_blocks / NESTED_BLOCKSIZE) + 4  # absmax_q u8, nested fp32, offset fp32


def nf4_experts_shard_bytes(experts: int, rows: int, cols: int, world: int) -> tuple[int, int]:
    """(4-bit codes, quantization constants) of one rank's NF4Experts shard: whole experts
    (model/nf4_experts.py), each one quantization unit of its own, as one 2-D NF4 weight."""
    if experts % world:  # as the loader refuses (model/experts.py: quantize_experts)
        raise ConfigError(f"{experts} experts cannot be split evenly over {world} ranks (each rank holds whole NF4 "
                          f"experts); use a world size that divides {experts}")
    codes, constants = nf4_shard_bytes(rows, cols, 1)
    return experts // world * codes, experts // world * constants


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
    frozen_w = 1 if _frozen_replicated(opt) else opt.world_size  # the frozen base: whole, or rank 0's shard
    codes = constants = dense_weights = 0
    for out_f, in_f in geo.linears().values():
        if opt.quantized:
            c, q = nf4_shard_bytes(out_f, in_f, frozen_w)
            codes, constants = codes + c, constants + q
        else:  # lora/dora: the frozen base linears stay bf16
            dense_weights += row_chunk(out_f, frozen_w) * in_f * 2
    for experts, out_f, in_f in geo.layer_experts.values():
        if opt.quantized:
            c, q = nf4_experts_shard_bytes(experts, out_f, in_f, frozen_w)
            codes, constants = codes + c, constants + q
        else:  # bf16 experts, split by rows of dim 0 (the experts) like any FSDP2 parameter
            dense_weights += row_chunk(experts, frozen_w) * out_f * in_f * 2
    frozen = sum(_sharded_elements(shape, frozen_w) * 2 for shape in geo.root_frozen)  # embeddings, lm_head, final norm
    layer_frozen = sum(_sharded_elements(shape, frozen_w) * 2 for shape in geo.layer_frozen)  # norms, routers...
    layer_frozen += sum(row_chunk(out_f, frozen_w) * in_f * 2 for out_f, in_f in geo.layer_routers.values())  # bf16 linears
    layer_frozen += sum(row_chunk(out_f, frozen_w) * 2 for out_f in geo.layer_biases.values())  # linear biases (bf16)
    adapter_elems, optimizer = 0, 0
    for shape in geo.adapter_shapes(opt.adapter):
        local = _sharded_elements(shape, opt.world_size)
        adapter_elems += local
        optimizer += _optimizer_bytes(shape, local, opt)
    return {
        "nf4_weights": codes * geo.layers,
        "quant_constants": constants * geo.layers,
        "frozen_bf16": frozen + (dense_weights + layer_frozen) * geo.layers,
        "adapter_params": adapter_elems * 4 * geo.layers,
        "adapter_grads": adapter_elems * 4 * geo.layers,
        "optimizer_state": optimizer * geo.layers,
    }


def _frozen_replicated(opt: Options) -> bool:
    """Whether every rank holds the frozen base whole, outside FSDP2: the sharding layer's rule."""
    from fsdp_qlora.distributed.sharding import frozen_replication  # torch: only when planning

    return frozen_replication(opt.world_size, opt.fsdp_units != "model", opt.cpu_offload)


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
    Experts and their router: `moe_bytes_per_token`.
    """
    h, kv, i = geo.hidden, geo.kv_heads * geo.head_dim, geo.intermediate
    total = 12 * h + 6 * h + 6 * kv + 4 * geo.heads + 8 * i
    targets = geo.targets(opt.adapter.target_modules)
    if opt.adapter.dropout > 0:
        total += sum(3 * geo.adaptable()[n][1] + 2 * opt.adapter.r for n in targets)
    else:
        total += 2 * opt.adapter.r * len(targets)
    if opt.adapter.use_dora:
        total += sum(4 * geo.adaptable()[n][0] for n in targets)
    return total + moe_bytes_per_token(geo, opt)


def moe_bytes_per_token(geo: Geometry, opt: Options) -> int:
    """Bytes autograd keeps per token for one layer's experts and router (0 in a dense layer).

    The router keeps its fp32 softmax (4 bytes per expert) and the top-k values and int64 indices
    (12 bytes each). A token reaches top_k experts, and each expert keeps, per token it received
    (model/experts.py's loop, transformers' eager one): its gate_up output and SiLU(gate) (bf16,
    6 bytes per feature of the expert intermediate I_e), its output twice (bf16, 2H each: before
    the routing-weight product, which keeps it, and after it, which index_add_ keeps), that fp32
    weight and the int64 token/slot indices (4 + 16); an adapted expert weight also its bf16 input
    (gate_up: the gathered hidden state, 2H; down_proj: the gated product, 2 I_e) and its rank-r
    intermediate (2r). The base matmuls keep nothing: backward dequantizes the expert again.
    Counted on a real layer's autograd graph; gpt-oss's clamped SwiGLU keeps a few more I_e-sized
    tensors than this.
    """
    if not geo.layer_experts:
        return 0
    routed = 6 * geo.expert_intermediate() + 4 * geo.hidden + 4 + 16
    routed += sum(2 * geo.layer_experts[n][2] + 2 * opt.adapter.r for n in geo.expert_targets(opt.adapter))
    return geo.top_k * routed + 4 * geo.num_experts() + 12 * geo.top_k


def mlp_backward_bytes_per_token(geo: Geometry) -> int:
    """The MLP's tensors in flight during a layer's backward: the bf16 grads of the dense MLP's gate,
    up, activation and product (4 x 2I). Experts run backward one at a time, each over its own
    tokens (top_k / experts of them on average, balanced routing), with the full-size gradient of
    the hidden states that each expert's gather scatters into (2H); a recomputed experts loop
    also leaves its output buffer and int64 routing mask, (experts + 1) x top_k, alive to its end."""
    total = 8 * geo.intermediate
    if geo.layer_experts:
        experts, top_k = geo.num_experts(), geo.top_k
        total += 8 * geo.expert_intermediate() * top_k // experts + 2 * geo.hidden
        total += 2 * geo.hidden + 8 * (experts + 1) * top_k
    return total


def dora_temporary_bytes_per_token(geo: Geometry, opt: Options) -> int:
    """DoRA's fp32 (tokens x out) working tensors for the linear being computed: the magnitude
    ratio times the base and adapter outputs in forward, their gradients in backward (~2 alive)."""
    if not opt.adapter.use_dora:
        return 0
    return 8 * max(geo.adaptable()[n][0] for n in geo.targets(opt.adapter.target_modules))


def gathered_layer_bytes(geo: Geometry, opt: Options) -> int:
    """One all-gathered decoder layer's base weights: every linear and every expert (FSDP2 gathers a
    whole layer at once), in NF4 or, for lora/dora, bf16."""
    if opt.quantized:
        return (sum(sum(nf4_shard_bytes(o, i, 1)) for o, i in geo.linears().values())
                + sum(sum(nf4_experts_shard_bytes(e, o, i, 1)) for e, o, i in geo.layer_experts.values()))
    return sum(o * i * 2 for o, i in geo.linears().values()) + sum(e * o * i * 2 for e, o, i in geo.layer_experts.values())


def gpu_bytes_for(cfg_gib: float, device=None) -> int:
    """The memory one rank may plan for: --gpu-memory-gib, else the GPU's own, else 24 GiB (a
    machine without a GPU plans for the project's reference card)."""
    if cfg_gib > 0:
        return int(cfg_gib * GIB)
    import torch

    if device is not None and getattr(device, "type", None) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return 24 * GIB


# --fsdp-units auto / --dequantize-once unset: the faster settings first. Both trade memory for speed
# (docs/benchmarks.md, 2-rank SmolLM2-135M on CPU: model unit 1.4x, dequantizing once +15%); the
# model unit first, since it saves per-layer collectives and hooks on every layer.
SPEED_CANDIDATES = (("model", True), ("model", False), ("layer", True), ("layer", False))


def choose_speed_options(config: dict[str, Any], opt: Options, budget: int | None = None) -> Options:
    """`opt` with --fsdp-units auto and an unset --dequantize-once decided: the first of
    `SPEED_CANDIDATES` (keeping whatever the user set) whose plan fits `budget` bytes (default: the
    GPU's, `gpu_bytes_for`); the frugal end (per-layer units, dequantizing twice) when none does."""
    if opt.fsdp_units != "auto" and opt.dequantize_once is not None:
        return opt
    budget = gpu_bytes_for(opt.gpu_memory_gib) if budget is None else budget
    candidates = [opt.replace(fsdp_units=units, dequantize_once=once) for units, once in SPEED_CANDIDATES
                  if opt.fsdp_units in ("auto", units) and opt.dequantize_once in (None, once)]
    for candidate in candidates:
        if plan_memory(config, candidate).fits(budget):
            return candidate
    return candidates[-1]


def plan_memory(config: dict[str, Any], opt: Options) -> Plan:
    opt = choose_speed_options(config, opt)
    geo = Geometry.from_config(config)
    static = static_bytes(geo, opt)
    tokens = opt.batch_size * opt.context_length
    w = opt.world_size
    # With no parameter split (one rank, or --sharding ddp) the frozen weights are not FSDP2's: they
    # are never gathered, only the adapters are (distributed/sharding.py: frozen_replication).
    replicated = _frozen_replicated(opt)
    layer_full = 0 if replicated else gathered_layer_bytes(geo, opt)
    # one weight dequantized per matmul: a linear's, or one expert's (the experts loop frees each);
    # a bf16 base is gathered as is, nothing to dequantize
    weights = [*geo.linears().values(), *((o, i) for _, o, i in geo.layer_experts.values())]
    biggest_bf16 = max(o * i for o, i in weights) * 2 if opt.quantized else 0
    layer_adapter = sum(math.prod(shape) for shape in geo.adapter_shapes(opt.adapter))
    # current + prefetched layer, or all of them (--no-reshard-after-forward; --fsdp-units model: in the root's unit)
    gathered_layers = 2 if opt.reshard_after_forward and opt.fsdp_units == "layer" else geo.layers + 1
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
    vocab_matrix = 0 if replicated else geo.vocab * geo.hidden * 2  # one bf16 embedding or lm_head weight, gathered
    parts["root_unsharded"] = vocab_matrix + (0 if replicated else geo.hidden * 2)
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
    # through it (the MLP's, and the attention output's and residual stream's, 3 x 2H) and DoRA's
    # fp32 products.
    layer_backward = mlp_backward_bytes_per_token(geo) + 6 * geo.hidden + dora_temporary_bytes_per_token(geo, opt)
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
    if opt.dequantize_once and opt.quantized:
        # --dequantize-once: each non-checkpointed layer keeps its linears dequantized (compute dtype,
        # 2 bytes) until its backward; a checkpointed one only while it is recomputed (one at a time).
        layer_dense = sum(out_f * in_f for out_f, in_f in geo.linears().values()) * 2
        parts["activations"] += (plain + (1 if checkpointed else 0)) * layer_dense
    step_peak = parts["layer_buffers"] + parts["activations"] + parts["logits_and_loss"]
    if forward_start > step_peak:
        parts.update(layer_buffers=0, activations=0, logits_and_loss=0, embeddings_at_forward_start=forward_start)
    return Plan(parts, host, sum(parts.values()), opt)
