"""How tensors are cut: FSDP2's row split and the block sizes of the 4-bit and 8-bit formats.

Torch-free, so that the loader, the 8-bit optimizer and the memory planner share one definition
(and the planner stays importable without torch).
"""

from __future__ import annotations

import math

NF4_BLOCKSIZE = 64  # weights per first-level absmax (bitsandbytes' quantize_4bit, QLoRA's choice)
NESTED_BLOCKSIZE = 256  # first-level absmax values per second-level (double-quantization) absmax
OPTIMIZER_BLOCKSIZE = 256  # elements per absmax of bitsandbytes' blockwise 8-bit optimizer state


def row_chunk(rows: int, parts: int) -> int:
    """Rows per part under `torch.chunk` (FSDP2's Shard(0)): ceil(rows / parts); the first parts
    get this many, the last what remains (possibly 0)."""
    return math.ceil(rows / parts)


def row_range(rows: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` of `rows` rows split by `torch.chunk` into `parts`."""
    chunk = row_chunk(rows, parts)
    start = min(index * chunk, rows)
    return start, min(start + chunk, rows)


def row_counts(rows: int, parts: int) -> list[int]:
    """How many rows each of the `parts` holds."""
    return [stop - start for start, stop in (row_range(rows, parts, i) for i in range(parts))]
