"""Where the project keeps the models it makes or converts (tiny Llama, converted GGUF files)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable


def default_cache_dir() -> Path:
    """$FSDP_QLORA_CACHE, else ~/.cache/fsdp_qlora (--model-cache-dir overrides both)."""
    return Path(os.environ.get("FSDP_QLORA_CACHE") or Path.home() / ".cache" / "fsdp_qlora")


def make_once(directory: Path, make: Callable[[Path], object]) -> Path:
    """`directory`, made by `make(directory)` unless it exists. Every torchrun rank resolves the model,
    so concurrent callers serialize on a file lock: one makes it, the others find it finished."""
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not directory.is_dir():
            make(directory)
    return directory
