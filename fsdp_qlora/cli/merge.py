"""Merge a PEFT LoRA/DoRA adapter into its base model and write a plain Hugging Face model.

    python tools/merge_adapter.py --base BASE_DIR --adapter runs/x/adapter --output merged/ [--dtype bf16]

The base's safetensors shards are streamed one at a time: each is read, its adapted weights are
merged (PEFT's `merge_and_unload()` math, fsdp_qlora/peft/merge.py) and it is written under the
same file name, so host memory stays at about one shard. The index, config.json, tokenizer and
every other non-weight file are carried over. The result loads with
`AutoModelForCausalLM.from_pretrained(OUTPUT)` and serves anywhere (vLLM included: this is the
serving path for DoRA adapters, which vLLM does not load).

A QLoRA/QDoRA adapter is merged into the unquantized base it was trained on top of: the merged
model then differs from the training-time model by NF4's quantization error of the base.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.sources import safetensors_files
from fsdp_qlora.peft.merge import AdapterError, check_fits, merged_weight, read_adapter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX_NAME = "model.safetensors.index.json"


def merge_adapter(base: Path, adapter: Path, output: Path, dtype: torch.dtype | None = None) -> Path:
    """Write base + adapter, merged, to `output` (which must not exist); returns `output`."""
    if output.exists():
        raise FileExistsError(f"{output} already exists: choose another --output or remove it")
    _, layers = read_adapter(adapter)
    files = safetensors_files(base)
    if not files:
        raise FileNotFoundError(f"{base} holds no *.safetensors weights: pass a Hugging Face model directory")
    check_fits(layers, _weight_shapes(files))
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=_parent(output)))
    try:
        staging.chmod(0o755)
        weight_map, total = {}, 0
        for file in files:
            keys, size = _merge_file(file, staging / file.name, layers, dtype)
            weight_map.update({key: file.name for key in keys})
            total += size
        _copy_other_files(base, staging, dtype)
        if (base / INDEX_NAME).is_file() or len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _parent(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    return output.parent


def _weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers, without reading any data."""
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            shapes.update({key: tuple(reader.get_slice(key).get_shape()) for key in reader.keys()})
    return shapes


def _merge_file(source: Path, target: Path, layers, dtype: torch.dtype | None) -> tuple[list[str], int]:
    """One shard in, merged, one shard out; returns its keys and bytes. Only this shard is in memory."""
    tensors = {}
    with safe_open(str(source), framework="pt") as reader:
        metadata = reader.metadata() or {}
        for key in reader.keys():
            tensor = reader.get_tensor(key)
            layer = layers.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
            if layer is not None:
                tensor = merged_weight(tensor, layer, dtype)
            elif dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[key] = tensor.contiguous()
    save_file(tensors, str(target), metadata={**metadata, "format": "pt"})
    return list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def _copy_other_files(base: Path, staging: Path, dtype: torch.dtype | None) -> None:
    """config.json (with the new dtype), tokenizer, generation config, ...: all but the weights."""
    for path in sorted(base.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_NAME:
            shutil.copy2(path, staging / path.name)
    config_file = staging / "config.json"
    if dtype is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        name = str(dtype).removeprefix("torch.")
        config.update({key: name for key in ("torch_dtype", "dtype") if key in config} or {"torch_dtype": name})
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model directory (config.json + *.safetensors)")
    parser.add_argument("--adapter", required=True, help="a PEFT adapter directory (adapter_config.json + weights)")
    parser.add_argument("--output", required=True, help="directory to create for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: each tensor's dtype in the base)")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(Path(args.base), Path(args.adapter), Path(args.output), DTYPES.get(args.dtype))
    except (AdapterError, ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"merge_adapter.py: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
