"""Synthetic base weights (``--synthetic-weights``): any architecture from its config alone, no checkpoint.

What it is for: the real memory and speed of a configuration on your hardware (a 70B on your GPUs)
before downloading 140 GB, and the GPU checks (tools/gpu_check.py). The weights are random, so the
loss means nothing; everything else (shapes, NF4 bytes, sharding, activations, steps) is a real run's.

Two halves:

* `synthetic_model_dir` stands in for the checkpoint directory: ``config.json`` and a tokenizer, no
  weights, made once in the model cache without any download. The config is an alias' registry values
  (model/registry.py), tiny-llama's, or a local ``config.json`` (a file, or a directory holding one).
  The tokenizer is that directory's own when it has one; otherwise the project's bundled byte-level BPE
  (tiny-llama's: 1024 tokens trained on the bundled data), whose ids fit any vocabulary at least that
  large. Its tokens are shorter than a real tokenizer's, and the bundled data is small, so to measure
  a context length use ``--dataset synthetic`` (data/sources.py): every row then fills
  ``--context-length``, as a real run's rows would.
* `fill_synthetic_weights` replaces `load_base_weights`: every frozen parameter gets this rank's rows,
  norm weights 1 (a 1-D ``weight``) and everything else (linears, experts, embeddings, lm_head, routers,
  biases) a normal of std ``initializer_range`` (transformers' init scale; 0.02 by default). The rows are
  drawn on the device in blocks whose seeds depend on the seed, the tensor's checkpoint name and the
  block's index, never on the world size, and are then quantized exactly as the loader quantizes rows
  it read. So a rank draws only the rows it owns, and its NF4 bytes equal those of the same rows in a
  1-process build: the project's rule, the same bytes at every world size (tests/test_synthetic.py).
  Norm weights of 1 are the identity for ``w * x`` norms; Gemma's ``(1 + w) * x`` norms then scale by 2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model import gguf
from fsdp_qlora.model.experts import expert_shapes
from fsdp_qlora.model.loader import (
    STORAGE_DTYPE,
    check_all_loaded,
    checkpoint_key_to_param,
    install_local,
    install_local_rows,
    param_rows,
    tie_missing,
    tied_keys,
)
from fsdp_qlora.model.nf4_experts import empty_nf4_experts, set_expert
from fsdp_qlora.model.quantized_linear import NF4Linear
from fsdp_qlora.model.registry import alias_config

# Bump when the directory's contents change for the same source (part of its cache key).
SYNTHETIC_VERSION = 1
MARKER = "synthetic.json"  # in the directory: what it was made from (and that it holds no weights)
# Values per seeded draw: a whole number of rows of at least this many values is one block (one
# generator), so the blocks, hence the values, depend on the tensor's shape alone. 4 Mi fp32 values
# (16 MiB) per draw keep the launches few on a GPU and the temporary small.
BLOCK_VALUES = 1 << 22
DEFAULT_STD = 0.02  # transformers' initializer_range when a config does not set it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


# ---- the stand-in directory ----------------------------------------------------------------------
def synthetic_model_dir(name: str, cache: Path) -> Path:
    """config.json + tokenizer for `name` (alias, tiny-llama, config.json or a directory), no weights,
    made once in `cache` (every rank asks; one makes it under a lock, the others find it)."""
    config, tokenizer_dir = _source(name)
    key = _cache_key(config, tokenizer_dir)
    out = cache / f"synthetic-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(name).name or 'model')}-{key}"
    if out.is_dir():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not out.is_dir():
            _write_dir(out, name, config, tokenizer_dir)
    return out


def _source(name: str) -> tuple[dict[str, Any], Path | None]:
    """(config.json values, the directory whose tokenizer to use or None for the bundled one)."""
    if name == "tiny-llama":
        from fsdp_qlora.model.tiny_llama import TINY_LLAMA_CONFIG

        return {"model_type": "llama", **TINY_LLAMA_CONFIG}, None
    known = alias_config(name)
    if known is not None:
        return known, None
    path = Path(name).expanduser()
    if gguf.is_gguf_source(path):
        raise ConfigError(f"--synthetic-weights builds a model from its config, but {name} is a GGUF file (its "
                          "weights and config in one): drop --synthetic-weights, or pass an alias or a config.json")
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.name.endswith(".json") and config_file.is_file():
        values = json.loads(config_file.read_text())
        if not isinstance(values, dict) or "hidden_size" not in values and "text_config" not in values:
            raise ConfigError(f"{config_file} is not a model's config.json (no hidden_size): pass an alias or a "
                              "Hugging Face config.json to --model with --synthetic-weights")
        return values, config_file.parent if _has_tokenizer(config_file.parent) else None
    if path.is_dir():
        raise ConfigError(f"{path} has no config.json: --synthetic-weights needs the model's config.json (the "
                          "weights may be absent)")
    if name.startswith(("/", ".", "~")) or path.suffix == ".json":
        raise ConfigError(f"{path} does not exist: with --synthetic-weights pass an alias, tiny-llama, or a "
                          "config.json (or a directory holding one) to --model")
    raise ConfigError(f"--synthetic-weights builds {name!r} from its config without downloading, but it is "
                      f"neither an alias (docs/models.md) nor a local config.json: fetch only its config "
                      f"(`hf download {name} config.json --local-dir DIR`) and pass DIR to --model")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _cache_key(config: dict[str, Any], tokenizer_dir: Path | None) -> str:
    digest = hashlib.sha256(json.dumps([SYNTHETIC_VERSION, config], sort_keys=True, default=str).encode())
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if (tokenizer_dir / name).is_file():
            digest.update(name.encode() + (tokenizer_dir / name).read_bytes())
    return digest.hexdigest()[:12]


def _write_dir(out: Path, name: str, config: dict[str, Any], tokenizer_dir: Path | None) -> None:
    """Write into a temporary sibling and rename: a crash never leaves a half-made directory."""
    tokenizer = _tokenizer(config, tokenizer_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "source": name, "tokenizer": str(tokenizer_dir) if tokenizer_dir else "bundled (tiny-llama's BPE)",
            "weights": "none: --synthetic-weights draws them on each rank (fsdp_qlora/model/synthetic.py)"}, indent=1))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed


def _tokenizer(config: dict[str, Any], tokenizer_dir: Path | None):
    """The source directory's tokenizer, or the bundled one (checked to fit the vocabulary)."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir)
    from fsdp_qlora.model.tiny_llama import TINY_LLAMA_CONFIG, train_tokenizer, training_texts

    text = config.get("text_config") or config
    tokenizer = train_tokenizer(training_texts(), TINY_LLAMA_CONFIG["vocab_size"],
                                int(text.get("max_position_embeddings") or 1 << 20))
    if len(tokenizer) > int(text["vocab_size"]):
        raise ConfigError(f"the bundled tokenizer has {len(tokenizer)} tokens, more than this model's vocab_size "
                          f"{text['vocab_size']}: put a tokenizer that fits next to its config.json")
    return tokenizer


def is_synthetic_dir(model_dir: Path) -> bool:
    return (Path(model_dir) / MARKER).is_file()


# ---- the weights ---------------------------------------------------------------------------------
def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def synthetic_rows(name: str, rows: int, cols: int, start: int, stop: int, seed: int, std: float,
                   device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of the seeded normal (rows, cols) matrix named `name`, in bf16 on `device`.

    The matrix is drawn in blocks of whole rows (at least `BLOCK_VALUES` values each), each from its
    own generator seeded by (seed, name, block index); only the blocks overlapping [start, stop) are
    drawn. The same rows thus have the same values whichever range asks for them (on one device
    type: CPU and CUDA generators differ)."""
    per_block = max(1, BLOCK_VALUES // cols)
    parts = []
    for block in range(start // per_block, math.ceil(stop / per_block)):
        first, last = block * per_block, min(rows, (block + 1) * per_block)
        generator = torch.Generator(device=device).manual_seed(_block_seed(seed, name, block))
        values = torch.randn(last - first, cols, generator=generator, device=device)
        parts.append(values[max(start, first) - first: min(stop, last) - first].mul_(std).to(STORAGE_DTYPE))
    return torch.cat(parts) if parts else torch.empty(0, cols, dtype=STORAGE_DTYPE, device=device)


def fill_synthetic_weights(model: nn.Module, device: torch.device, seed: int,
                           compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Give an FSDP2-sharded model (quantized on meta, as `load_base_weights` expects it) this rank's
    rows of synthetic weights, by checkpoint name, instead of reading a checkpoint."""
    targets = checkpoint_key_to_param(model)
    tied = tied_keys(model, targets, set())  # a tied lm_head is the embedding: tied after, as a load does
    std = float(getattr(getattr(model, "config", None), "initializer_range", None) or DEFAULT_STD)
    for key in sorted(set(targets) - tied):
        holders = targets[key]
        module, attr = holders[0]
        if attr in expert_shapes(module):
            _fill_experts(key, holders, device, seed, std, compute_dtype)
        else:
            _fill_rows(key, holders, device, seed, std, compute_dtype)
    tie_missing(model, targets, set())
    check_all_loaded(model)


def _fill_rows(key: str, holders: list[tuple[nn.Module, str]], device: torch.device, seed: int, std: float,
               compute_dtype: torch.dtype) -> None:
    module, attr = holders[0]
    param = getattr(module, attr)
    nf4 = isinstance(module, NF4Linear) and attr == "weight"  # stored packed: draw the logical weight
    shape = (module.out_features, module.in_features) if nf4 else tuple(param.shape)
    start, stop = param_rows(param, shape[0])
    if attr == "weight" and len(shape) == 1:  # a norm's scale: the identity
        rows = torch.ones(stop - start, dtype=STORAGE_DTYPE, device=device)
    else:
        cols = math.prod(shape[1:])
        rows = synthetic_rows(key, shape[0], cols, start, stop, seed, std, device).reshape(-1, *shape[1:])
    for holder_module, holder_attr in holders:
        install_local_rows(holder_module, holder_attr, start, rows, device, compute_dtype)


def _fill_experts(key: str, holders: list[tuple[nn.Module, str]], device: torch.device, seed: int, std: float,
                  compute_dtype: torch.dtype) -> None:
    """This rank's whole experts of a fused (experts, a, b) weight: expert e is rows e*a.. of the
    (experts * a, b) matrix `key`, quantized on its own as the loader does (model/nf4_experts.py)."""
    module, attr = holders[0]
    param = getattr(module, attr)
    experts, a, b = expert_shapes(module)[attr]
    start, stop = param_rows(param, experts)
    quantized = param.dtype == torch.uint8
    local = (empty_nf4_experts(stop - start, a, b, device, compute_dtype) if quantized
             else torch.empty(stop - start, a, b, dtype=param.dtype, device=device))
    for expert in range(start, stop):
        weight = synthetic_rows(key, experts * a, b, expert * a, (expert + 1) * a, seed, std, device)
        if quantized:
            set_expert(local, expert - start, weight)
        else:
            local[expert - start].copy_(weight)
    install_local(holders, local)
