"""--compile: torch.compile (inductor, on CPU as on GPU) of every decoder layer's forward.

Per layer, as torchtitan does, not the whole model: every layer runs the same code, so dynamo
compiles one graph for all of them (their parameters are graph inputs, not constants), and the
embeddings, loss and FSDP2's unit boundaries stay outside any graph. The layer's *forward* is
compiled, not the module's call: FSDP2's pre/post-forward hooks (all-gather, reshard) run around
it eagerly, and activation checkpointing or offloading (train/memory.py) wraps the compiled forward.
NF4 weights dequantize through one registered operator (model/nf4.py, `fsdp_qlora::dequantize_nf4`),
so the graph does not break at the quantized matmuls.

What it buys: inductor fuses the elementwise work between the matmuls (RMSNorm, rotary, SiLU x up,
the LoRA scaling and residual adds, the dtype casts), which in eager is one kernel and one pass
over memory per op. Measured in docs/benchmarks.md. What it costs: the first steps compile (one
graph for the first layer, whose input needs no gradient, one for the others, and once more with
dynamic sequence lengths when a batch of another length arrives), seconds to a minute per graph.
Numerics: inductor keeps fused bf16 intermediates in fp32 instead of rounding each op's result,
so losses differ from eager by bf16 rounding (tests/test_speed_options.py).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_layers(layers: nn.ModuleList) -> None:
    """Replace each layer's forward by its compiled version (in place: names and hooks unchanged)."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
