"""A model's structure from transformers' own classes, built on the meta device (no weights, no memory).

The loader and the memory planner both read architectures from here, so neither carries a
description of Llama (or any model) of its own: which linears a decoder layer has and their shapes,
biases, norms, tied embeddings all come from the class transformers instantiates for the config.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.registry import ARCHITECTURES


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
    for name, param in layers[0].named_parameters():
        if param.ndim > 2:
            raise ConfigError(f"model_type {model_type!r}: decoder layers hold {param.ndim}-D parameters "
                              f"({name} {tuple(param.shape)}, fused mixture-of-experts weights), which this "
                              "version does not quantize or adapt: use a dense model")
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
    linears: dict[str, tuple[int, int]]  # one decoder layer's linears: name in the layer -> (out, in)
    biases: dict[str, int]  # those linears that have a bias -> its length
    layer_frozen: tuple[tuple[int, ...], ...]  # one layer's other parameters (norms, q/k norms)
    root_frozen: tuple[tuple[int, ...], ...]  # outside the layers: embeddings, final norm, lm_head (once if tied)
    tied: bool
    layer_prefix: str  # the first layer's qualified name plus ".", e.g. "model.layers.0."


def model_shapes(config: dict) -> ModelShapes:
    """`ModelShapes` of a config.json dict, from its model class built on meta (cached per config)."""
    return _model_shapes(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _model_shapes(config_json: str) -> ModelShapes:
    model = meta_model(config_from_dict(json.loads(config_json)))
    layers = decoder_layers(model)
    per_layer = [_layer_shapes(layer) for layer in layers]
    if any(shapes != per_layer[0] for shapes in per_layer):
        raise ValueError(f"{type(model).__name__}'s decoder layers differ in shape; the planner assumes alike layers")
    linears, biases, frozen = per_layer[0]
    in_layers = {id(p) for p in layers.parameters()}
    root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_layers)  # parameters() dedupes ties
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    prefix = next(name for name, module in model.named_modules() if module is layers[0]) + "."
    return ModelShapes(model.config.model_type, len(layers), linears, biases, frozen, root, tied, prefix)


def _layer_shapes(layer: nn.Module):
    linears, biases, frozen = {}, {}, []
    linear_params = set()
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            linears[name] = (module.out_features, module.in_features)
            linear_params.add(id(module.weight))
            if module.bias is not None:
                biases[name] = module.out_features
                linear_params.add(id(module.bias))
    frozen = tuple(tuple(p.shape) for p in layer.parameters() if id(p) not in linear_params)
    return linears, biases, frozen
