"""The stand-in for a checkpoint directory that ``--synthetic-weights`` loads from: the model's
``config.json`` and a tokenizer, no weights, made once in the model cache without any download.

The config is an alias' registry values (model/registry.py), tiny-llama's, or a local ``config.json``
(a file, or a directory holding one). The tokenizer is that directory's own when it has one; otherwise
the project's bundled byte-level BPE (tiny-llama's: 1024 tokens trained on the bundled data), whose ids
fit any vocabulary at least that large. The weights are drawn by model/synthetic.py. Kept apart from it
so that model/sources.py can make the directory without importing the loader (no import cycle).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model import gguf
from fsdp_qlora.model.cache import make_once
from fsdp_qlora.model.registry import alias_config

# Bump when the directory's contents change for the same source (part of its cache key).
SYNTHETIC_VERSION = 1
MARKER = "synthetic.json"  # in the directory: what it was made from (and that it holds no weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def synthetic_model_dir(name: str, cache: Path) -> Path:
    """config.json + tokenizer for `name` (alias, tiny-llama, config.json or a directory), no weights,
    made once in `cache` (every rank asks; one makes it under a lock, the others find it)."""
    config, tokenizer_dir = _source(name)
    key = _cache_key(config, tokenizer_dir)
    out = cache / f"synthetic-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(name).name or 'model')}-{key}"
    return make_once(out, lambda directory: _write_dir(directory, name, config, tokenizer_dir))


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
