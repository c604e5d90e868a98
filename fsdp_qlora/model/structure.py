"""A model's structure from transformers' own classes, built on the meta device (no weights, no memory).

The loader and the memory planner both read architectures from here, so neither carries a
description of Llama (or any model) of its own: which linears a decoder layer has and their shapes,
biases, norms, tied embeddings all come from the class transformers instantiates for the config.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.experts import check_experts, expert_params, expert_shapes, use_our_experts_forward
from fsdp_qlora.model.registry import ARCHITECTURES, is_router


def config_from_dict(values: dict) -> PretrainedConfig:
    """A transformers config from config.json values (``model_type`` defaults to llama)."""
    values = dict(values)
    model_type = values.pop("model_type", "llama")
    values.pop("architectures", None)
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as err:
        raise ConfigError(f"model_type {model_type!r} is unknown to transformers ({err}): upgrade transformers "
                          "or check config.json") from None


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16,
               trust_remote_code: bool = False) -> nn.Module:
    """transformers' causal-LM class for `config`, on the meta device, checked for what the loader handles."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise ConfigError(f"model_type {config.model_type!r} has no causal-LM class in transformers ({err}): "
                          "fsdp_qlora fine-tunes decoder-only language models") from None
    check_architecture(model)
    use_our_experts_forward(model)  # a no-op setting for dense models
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList with one entry per hidden layer."""
    if getattr(model, "config", None) is None:
        raise ValueError(f"{type(model).__name__} is not a transformers model (no config)")
    num_layers = _text_config(model.config).num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")


def check_architecture(model: nn.Module) -> None:
    """Refuse, in one line, what the loader cannot load correctly; warn about untested model types."""
    model_type = model.config.model_type
    try:
        layers = decoder_layers(model)
    except ValueError as err:
        raise ConfigError(f"model_type {model_type!r}: {err}: fsdp_qlora needs a decoder-only model whose "
                          "layers are one ModuleList") from None
    for name, module in layers[0].named_modules():
        if expert_params(module):
            check_experts(model_type, name, module)
    for name, param in layers[0].named_parameters():
        if param.ndim > 3:
            raise ConfigError(f"model_type {model_type!r}: decoder layers hold the {param.ndim}-D parameter {name} "
                              f"{tuple(param.shape)}, which fsdp_qlora cannot load")
    if model_type not in ARCHITECTURES:
        print(f"warning: model_type {model_type!r} is not among the tested architectures "
              f"({', '.join(ARCHITECTURES)}); loading it through transformers' own class as a dense decoder",
              flush=True)


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class ModelShapes:
    """The parameter shapes the memory planner needs, read off transformers' class for a config."""

    model_type: str
    layers: int
    linears: dict[str, tuple[int, int]]  # one decoder layer's quantized linears: name in the layer -> (out, in)
    biases: dict[str, int]  # those linears and the router linears that have a bias -> its length
    # one layer's other parameters, all bf16: norms, q/k norms, attention sinks, routers that are not
    # nn.Linear (a 2-D weight, a bias), expert biases (experts, features)
    layer_frozen: tuple[tuple[int, ...], ...]
    root_frozen: tuple[tuple[int, ...], ...]  # outside the layers: embeddings, final norm, lm_head (once if tied)
    tied: bool
    layer_prefix: str  # the first layer's qualified name plus ".", e.g. "model.layers.0."
    # linears the registry names as routers (Qwen2-MoE's shared_expert_gate): bf16, adapted only when named
    routers: dict[str, tuple[int, int]] = field(default_factory=dict)
    # fused expert weights (model/experts.py): name in the layer -> logical (experts, a, b)
    experts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    experts_transposed: bool = False  # experts compute x @ W_e, (a, b) = (in, out) (gpt-oss); else (out, in)
    top_k: int = 0  # experts each token is routed to (config's num_experts_per_tok); 0 without experts


@dataclass(frozen=True)
class _LayerShapes:
    linears: dict[str, tuple[int, int]]
    biases: dict[str, int]
    frozen: tuple[tuple[int, ...], ...]
    routers: dict[str, tuple[int, int]]
    experts: dict[str, tuple[int, int, int]]
    transposed: bool


def model_shapes(config: dict) -> ModelShapes:
    """`ModelShapes` of a config.json dict, from its model class built on meta (cached per config)."""
    return _model_shapes(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _model_shapes(config_json: str) -> ModelShapes:
    model = meta_model(config_from_dict(json.loads(config_json)))
    layers = decoder_layers(model)
    per_layer = [_layer_shapes(layer, model.config.model_type) for layer in layers]
    _check_alike(type(model).__name__, per_layer)
    first = per_layer[0]
    in_layers = {id(p) for p in layers.parameters()}
    root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_layers)  # parameters() dedupes ties
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    prefix = next(name for name, module in model.named_modules() if module is layers[0]) + "."
    top_k = getattr(_text_config(model.config), "num_experts_per_tok", 0) if first.experts else 0
    return ModelShapes(model.config.model_type, len(layers), first.linears, first.biases, first.frozen, root, tied,
                       prefix, first.routers, first.experts, first.transposed, top_k)


def _check_alike(model_name: str, per_layer: list[_LayerShapes]) -> None:
    """The planner counts one layer times the number of layers: refuse models whose layers differ."""
    different = [index for index, shapes in enumerate(per_layer) if shapes != per_layer[0]]
    if not different:
        return
    moe = [index for index, shapes in enumerate(per_layer) if shapes.experts]
    if moe and len(moe) < len(per_layer):
        raise ConfigError(f"{model_name} mixes dense layers and mixture-of-experts layers (experts in "
                          f"{len(moe)} of {len(per_layer)} layers: decoder_sparse_step / mlp_only_layers); the "
                          "memory planner assumes all layers alike")
    raise ConfigError(f"{model_name}'s decoder layers differ in shape (layer {different[0]} from layer 0); the "
                      "memory planner assumes all layers alike")


def _layer_shapes(layer: nn.Module, model_type: str) -> _LayerShapes:
    linears, biases, routers, experts = {}, {}, {}, {}
    counted, transposed = set(), False
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            # the loader's rule (quantize_decoder_linears): a router linear stays in the compute dtype
            (routers if is_router(model_type, name) else linears)[name] = (module.out_features, module.in_features)
            counted.add(id(module.weight))
            if module.bias is not None:
                biases[name] = module.out_features
                counted.add(id(module.bias))
        for param, shape in expert_shapes(module).items():  # none outside experts modules
            experts[f"{name}.{param}"] = shape
            counted.add(id(getattr(module, param)))
            transposed = bool(module.is_transposed)
    frozen = tuple(tuple(p.shape) for p in layer.parameters() if id(p) not in counted)
    return _LayerShapes(linears, biases, frozen, routers, experts, transposed)
