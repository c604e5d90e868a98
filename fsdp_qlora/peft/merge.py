"""Read a PEFT LoRA/DoRA adapter, check it against a base model, and merge it into base weights.

The merged weight is PEFT's `merge_and_unload()`:
  * LoRA: ``W' = W + s·B·A``;
  * DoRA: ``W' = m / ||W + s·B·A||_row * (W + s·B·A)``, the norm taken on the unmerged weight.
Used by tools/merge_adapter.py (streaming, shard by shard) and tools/generate.py (in memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fsdp_qlora.peft.export import DORA_MAGNITUDE, PEFT_KEY_PREFIX, load_peft_adapter
from fsdp_qlora.peft.lora import lora_scaling, pattern_value


class AdapterError(ValueError):
    """An adapter that cannot be applied to this base: the message names the problem and the fix."""


@dataclass
class AdapterLayer:
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scaling: float
    magnitude: torch.Tensor | None  # (out,), DoRA only

    def delta(self) -> torch.Tensor:
        """s·B·A in fp32 (out x in): merging writes the whole weight anyway."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, AdapterLayer]]:
    """adapter_config.json + weights -> (config, {module name in the base model: AdapterLayer}).

    Refuses (AdapterError, FileNotFoundError) anything PEFT would not load the same way: another
    PEFT type, unknown tensors, a module with A but no B, DoRA without magnitudes (or magnitudes
    without ``use_dora``), ranks that contradict the config.
    """
    config, tensors = load_peft_adapter(adapter_dir)
    if config.get("peft_type") != "LORA" or "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{adapter_dir}/adapter_config.json is not a LoRA adapter config (peft_type "
                           f"{config.get('peft_type')!r}, needs r and lora_alpha): pass a LoRA/DoRA adapter directory")
    if config.get("target_parameters"):
        # Experts are stored per expert in most checkpoints (model/expert_layout.py) and fused in the
        # model: merging would have to split each expert's update back into the checkpoint's layout.
        raise AdapterError(f"{adapter_dir} adapts mixture-of-experts weights (target_parameters "
                           f"{config['target_parameters']}), which merging does not handle yet: load it unmerged "
                           "with PEFT (PeftModel.from_pretrained(base, adapter_dir))")
    use_dora = bool(config.get("use_dora"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, kind = _split_key(key, adapter_dir)
        parts.setdefault(module, {})[kind] = tensor
    layers = {}
    for module, found in sorted(parts.items()):
        expected = {"lora_A", "lora_B"} | ({DORA_MAGNITUDE} if use_dora else set())
        if set(found) != expected:
            raise AdapterError(f"{adapter_dir}: module {module} has {sorted(found)}, expected {sorted(expected)} "
                               f"(use_dora={use_dora}): the adapter files are incomplete or from another tool")
        r = pattern_value(module, config.get("rank_pattern"), config["r"])
        if found["lora_A"].shape[0] != r or found["lora_B"].shape[1] != r:
            raise AdapterError(f"{adapter_dir}: {module} has rank {found['lora_A'].shape[0]}, the config says r={r}: "
                               "the config and weights do not belong together")
        alpha = pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"])
        layers[module] = AdapterLayer(found["lora_A"], found["lora_B"],
                                      lora_scaling(alpha, r, bool(config.get("use_rslora"))), found.get(DORA_MAGNITUDE))
    return config, layers


def _split_key(key: str, adapter_dir) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (X, "lora_A"); X.lora_magnitude_vector -> (X, magnitude)."""
    name = key.removeprefix(PEFT_KEY_PREFIX)
    for kind, suffix in (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"),
                         (DORA_MAGNITUDE, "." + DORA_MAGNITUDE)):
        if key.startswith(PEFT_KEY_PREFIX) and name.endswith(suffix):
            return name[: -len(suffix)], kind
    raise AdapterError(f"{adapter_dir}: unexpected tensor {key} (only lora_A/lora_B weights and DoRA magnitudes "
                       "can be merged; modules_to_save and bias adapters are not supported)")


def check_fits(layers: dict[str, AdapterLayer], weight_shapes: dict[str, tuple[int, ...]]) -> None:
    """Every adapted module must be a 2-D weight of the base with matching (out, in)."""
    for module, layer in layers.items():
        key = f"{module}.weight"
        if key not in weight_shapes:
            raise AdapterError(f"the adapter targets {module}, which the base model lacks: pass the base model the "
                               "adapter was trained on (adapter_config.json's base_model_name_or_path)")
        shape = tuple(weight_shapes[key])
        wanted = (layer.lora_B.shape[0], layer.lora_A.shape[1])
        magnitude_ok = layer.magnitude is None or tuple(layer.magnitude.shape) == (wanted[0],)
        if shape != wanted or not magnitude_ok:
            raise AdapterError(f"the adapter for {module} is {wanted[0]}x{wanted[1]} but the base weight is "
                               f"{'x'.join(map(str, shape))}: the adapter was trained on another base model")


def merged_weight(weight: torch.Tensor, layer: AdapterLayer, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight with the adapter merged in, in `dtype` (default: the weight's own), computed in fp32."""
    combined = weight.float() + layer.delta()
    if layer.magnitude is not None:
        # DoRA: the norm of the unmerged W + s·B·A, as PEFT's merge and our forward use.
        combined *= (layer.magnitude.float() / torch.linalg.vector_norm(combined, dim=1)).unsqueeze(1)
    return combined.to(dtype or weight.dtype)


def merge_into_model(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> int:
    """Merge an adapter into a loaded Hugging Face model in place; returns the merged weight count."""
    _, layers = read_adapter(adapter_dir)
    params = dict(model.named_parameters())
    check_fits(layers, {name: tuple(p.shape) for name, p in params.items()})
    with torch.no_grad():
        for module, layer in layers.items():
            weight = params[f"{module}.weight"]
            weight.copy_(merged_weight(weight, layer))
    return len(layers)
