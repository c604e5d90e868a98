"""The adapter a run trains, as one value: built once from the config, read by every consumer.

The layers (`peft/apply.py`), the PEFT export (`peft/export.py`), the memory planner and the
resume check all take an `AdapterSpec` instead of loose `r`, `alpha`, target and pattern
arguments, so a new adapter setting is added in one place. Its defaults are `TrainConfig`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fsdp_qlora.config import DEFAULT_TARGET_MODULES, DORA_TRAIN_TYPES, TrainConfig


@dataclass(frozen=True)
class AdapterSpec:
    """LoRA or DoRA on the modules `targets` names.

    targets: a tuple of names matched against the end of module names (PEFT's list form), the
    tuple ("all-linear",) (every linear of every decoder layer), or a str: a regex the whole module
    name must match (PEFT's str form).
    """

    targets: tuple[str, ...] | str = tuple(DEFAULT_TARGET_MODULES)
    r: int = TrainConfig.lora_rank
    alpha: float = TrainConfig.lora_alpha
    dropout: float = TrainConfig.lora_dropout
    use_dora: bool = False
    use_rslora: bool = TrainConfig.use_rslora
    rank_pattern: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # PEFT's rank_pattern
    alpha_pattern: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    loraplus_lr_ratio: float = TrainConfig.loraplus_lr_ratio
    # Fused expert weights adapted besides what `targets` implies (all-linear adapts them all): PEFT's
    # target_parameters, names matched against the end of "<module>.<weight>".
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "target_parameters", tuple(self.target_parameters))
        object.__setattr__(self, "rank_pattern", MappingProxyType(dict(self.rank_pattern)))
        object.__setattr__(self, "alpha_pattern", MappingProxyType(dict(self.alpha_pattern)))

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "AdapterSpec":
        return cls(targets=cfg.lora_target_regex or tuple(cfg.lora_target_modules), r=cfg.lora_rank,
                   alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_dora=cfg.train_type in DORA_TRAIN_TYPES,
                   use_rslora=cfg.use_rslora, rank_pattern=cfg.rank_pattern(), alpha_pattern=cfg.alpha_pattern(),
                   loraplus_lr_ratio=cfg.loraplus_lr_ratio, target_parameters=tuple(cfg.lora_target_parameters))

    @property
    def target_modules(self) -> list[str] | str:
        """PEFT's `target_modules` form: a regex str, or a list of names."""
        return self.targets if isinstance(self.targets, str) else list(self.targets)
