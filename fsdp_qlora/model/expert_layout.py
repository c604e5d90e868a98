"""Where a checkpoint keeps each expert's weights: the hub layouts mapped onto transformers v5's fused experts.

Checkpoints (and transformers' own `save_pretrained`) store one 2-D weight per expert and projection
(``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight``), while the v5 module
holds one fused 3-D parameter per projection (``mlp.experts.gate_up_proj``). The mapping is not
written here per model: it is transformers' own conversion description for the model type
(`transformers.conversion_mapping.get_checkpoint_conversion_mapping`: renamings such as Mixtral's
``.block_sparse_moe.`` -> ``.mlp.``, and converters that stack experts, `MergeModulelist(dim=0)`, then
concatenate gate and up, `Concatenate(dim=1)`), and keys are renamed with transformers' own
`rename_source_key`, so a model type transformers learns to load is loaded here the same way. Those
two operations are the layouts read; any other converter is refused in one line.

Nothing is read but headers: each fused parameter becomes a list of `ExpertPiece`s, the bytes of one
expert's part, so a rank reads exactly its own experts (model/loader.py). A checkpoint that already
stores the fused tensor (gpt-oss in bf16) gives one piece per expert: that expert's slice.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.shard_reader import RowRange, TensorEntry

_STACK, _CONCAT = "MergeModulelist", "Concatenate"
# MXFP4 checkpoints (gpt-oss on the hub) store each fused expert weight as `<name>_blocks` + `<name>_scales`.
_MXFP4_SUFFIXES = ("_blocks", "_scales")


@dataclass(frozen=True)
class ExpertPiece:
    """Rows `rows` of one expert's weight in a fused parameter come from `source` (a whole 2-D
    per-expert tensor, or the expert's slice of a stored 3-D one)."""
    expert: int
    part: int  # position among the concatenated sources (gate = 0, up = 1); 0 when nothing is concatenated
    source: RowRange


@dataclass(frozen=True)
class CheckpointLayout:
    plain: dict[str, TensorEntry]  # our parameter key -> the checkpoint tensor holding it as is
    experts: dict[str, list[ExpertPiece]]  # fused expert parameter key -> its pieces, by (expert, part)


def checkpoint_layout(model_type: str, index: dict[str, TensorEntry],
                      fused: dict[str, tuple[int, int, int]]) -> CheckpointLayout:
    """Map the checkpoint's tensors (`index`, from headers) onto the model's keys.

    `fused`: the model's fused expert parameters, key -> logical ``(experts, a, b)``. Raises
    `ConfigError` (one line) when the checkpoint's experts disagree with config.json or use a layout
    not read here."""
    renamings, converters = _conversion(model_type)
    plain: dict[str, TensorEntry] = {}
    found: dict[str, dict[tuple[int, int], TensorEntry]] = defaultdict(dict)
    for key, entry in index.items():
        target, pattern, converter = _rename(key, renamings, converters)
        if converter is None:
            plain[target] = entry
            continue
        if target not in fused:
            continue  # a converted tensor the model does not have (e.g. an MTP head)
        _check_operations(model_type, converter)
        expert = _expert_index(key, target)
        found[target][(expert, converter.source_patterns.index(pattern))] = entry
    experts = {}
    for target, shape in fused.items():
        if target in plain:
            experts[target] = _fused_pieces(plain.pop(target), shape)
        elif target in found:
            experts[target] = _stacked_pieces(target, found[target], shape)
        elif target + _MXFP4_SUFFIXES[0] in plain:
            raise ConfigError(f"{plain[target + _MXFP4_SUFFIXES[0]].file.parent}: {target} is stored in MXFP4 "
                              f"({target}_blocks/_scales); fsdp_qlora quantizes experts from bf16 weights: use a bf16 "
                              "copy of the checkpoint (e.g. one saved by transformers with dequantize=True)")
    return CheckpointLayout(plain, experts)


def _conversion(model_type: str):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    unknown = [t for t in transforms if not isinstance(t, (WeightRenaming, WeightConverter))]
    if unknown:
        raise ConfigError(f"model_type {model_type!r}: transformers converts its checkpoints with "
                          f"{type(unknown[0]).__name__}, a checkpoint layout fsdp_qlora does not read")
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _rename(key: str, renamings, converters):
    """(our key, the converter's source pattern that matched, the converter) with transformers' own
    renaming; the last two are None for a tensor no converter touches."""
    from transformers.core_model_loading import rename_source_key

    renamed, pattern = rename_source_key(key, renamings, converters)
    if pattern is None:
        return renamed, None, None
    converter = next(c for c in converters if pattern in c.source_patterns)
    return renamed, pattern, converter


def _check_operations(model_type: str, converter) -> None:
    names = [type(op).__name__ for op in converter.operations]
    dims = [getattr(op, "dim", None) for op in converter.operations]
    if names not in ([_STACK], [_STACK, _CONCAT]) or dims[0] != 0 or dims[1:] not in ([], [1]):
        ops = ", ".join(f"{name}(dim={dim})" for name, dim in zip(names, dims))
        raise ConfigError(f"model_type {model_type!r}: transformers builds {converter.target_patterns[0]} with "
                          f"{ops}, an expert layout fsdp_qlora does not read (it reads experts stacked, then "
                          "gate and up concatenated)")


def _expert_index(key: str, target: str) -> int:
    """The expert number in a per-expert key: the one integer component the fused key does not have."""
    numbers = Counter(part for part in key.split(".") if part.isdigit())
    numbers.subtract(part for part in target.split(".") if part.isdigit())
    extra = [number for number, count in numbers.items() for _ in range(count) if count > 0]
    if len(extra) != 1:
        raise ConfigError(f"checkpoint tensor {key}: cannot tell which expert it belongs to")
    return int(extra[0])


def _fused_pieces(entry: TensorEntry, shape: tuple[int, int, int]) -> list[ExpertPiece]:
    if entry.shape != shape:
        raise ConfigError(f"{entry.file.name}: {entry.name} has shape {entry.shape}, the model's config.json gives "
                          f"{shape}: the checkpoint does not match its config.json")
    return [ExpertPiece(expert, 0, RowRange(entry, expert, expert + 1)) for expert in range(shape[0])]


def _stacked_pieces(target: str, found: dict[tuple[int, int], TensorEntry],
                    shape: tuple[int, int, int]) -> list[ExpertPiece]:
    experts, rows, cols = shape
    parts = 1 + max(part for _, part in found)
    seen = sorted({expert for expert, _ in found})
    sample = next(iter(found.values()))
    if seen != list(range(experts)) or len(found) != experts * parts:
        raise ConfigError(f"{sample.file.parent}: the checkpoint holds {len(seen)} experts for {target} "
                          f"(numbered {_ranges(seen)}), config.json says {experts}: the checkpoint does not match "
                          "its config.json")
    part_shapes = [found[(0, part)].shape for part in range(parts)]
    if any(len(s) != 2 or s[1] != cols for s in part_shapes) or sum(s[0] for s in part_shapes) != rows:
        raise ConfigError(f"{sample.file.name}: the per-expert tensors of {target} have shapes "
                          f"{', '.join(map(str, part_shapes))}, which do not make the {rows}x{cols} expert weight "
                          "config.json gives: the checkpoint does not match its config.json")
    for (_, part), entry in found.items():
        if entry.shape != part_shapes[part]:
            raise ConfigError(f"{entry.file.name}: {entry.name} has shape {entry.shape}, expert 0's has "
                              f"{part_shapes[part]}: the checkpoint is inconsistent")
    return [ExpertPiece(expert, part, RowRange(entry, 0, entry.rows))
            for (expert, part), entry in sorted(found.items())]


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(spans) if spans else "none"

