"""Reading a GGUF file's header: its metadata and tensor table, in milliseconds, no tensor data.

Enough to refuse what is not a model transformers can load (model/gguf.py converts the rest) and
to describe a file's quantization. The format: magic, version, tensor and key-value counts, the
key-values (typed), then each tensor's name, shape, GGML type and offset.
"""

from __future__ import annotations

import importlib.metadata
import math
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdp_qlora.errors import ConfigError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what the gguf package's reader (and so transformers) reads
_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# llama.cpp architecture names that transformers' legacy GGUF loader renames before its check.
_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_NOT_CAUSAL_LM = {"t5", "t5encoder", "umt5"}  # transformers loads them, but not as a causal LM to fine-tune


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
        raise ConfigError(f"{path} holds a {arch!r} model, which transformers {package_version('transformers')} cannot "
                          f"load from GGUF (it loads {', '.join(sorted(supported - _NOT_CAUSAL_LM))}): pass the "
                          "model's Hugging Face safetensors directory or hub id to --model instead")
    unknown = sorted(set(info.tensor_types) - _dequantizable_types())
    if unknown:
        raise ConfigError(f"{path} stores tensors as {', '.join(unknown)}, which gguf {package_version('gguf')} cannot "
                          "dequantize: upgrade the gguf package (pip install -U gguf) or use another quantization "
                          "of the model")
    return info


# --- converting -----------------------------------------------------------------------------


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"
