"""Where the project keeps the models it makes or converts (tiny Llama, converted GGUF files)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$FSDP_QLORA_CACHE, else ~/.cache/fsdp_qlora (--model-cache-dir overrides both)."""
    return Path(os.environ.get("FSDP_QLORA_CACHE") or Path.home() / ".cache" / "fsdp_qlora")
