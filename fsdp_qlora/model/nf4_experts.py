"""A mixture-of-experts projection in NF4: one quantization unit per expert, sharded by experts.

transformers (v5) holds a layer's experts as fused 3-D parameters, ``(experts, a, b)``: each
expert's 2-D slice is the weight it computes with (``(out, in)``, or ``(in, out)`` for
`is_transposed` layouts such as gpt-oss). `NF4Experts` holds every slice quantized exactly as
bitsandbytes quantizes that 2-D weight on its own (`quantize_nf4`: NF4, blocks of 64, double
quantization over the expert's absmax), stacked:

  packed        uint8 (experts, a, b // 2)
  absmax_q      uint8 (experts, a * b // 64)
  nested_absmax fp32  (experts, ceil(a * b / 64 / 256))
  offset        fp32  (experts, 1)

Every inner tensor has the experts on dim 0, so FSDP2's ``Shard(0)`` gives a rank whole experts
with all their constants: a rank quantizes the experts it owns from their own rows, with no
exchange, and holds bytes identical to the 1-process model's at every world size that divides the
expert count. The all-gather moves the four tensors as their own uint8/fp32 buffers, like
`NF4Tensor`'s. `expert(e)` is expert e as an `NF4Tensor` (views, no copy): the forward dequantizes
one expert at a time (model/experts.py).
"""

from __future__ import annotations

import torch

from fsdp_qlora.model.nf4 import NF4Tensor, PackedNF4, quantize_nf4


class NF4Experts(PackedNF4):
    """Stacked NF4 expert weights; logical shape ``(experts, a, b // 2)`` uint8."""

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def expert_shape(self) -> torch.Size:
        """One expert's weight, as it computes with it: ``(a, b)``."""
        _, rows, half_cols = self.packed.shape
        return torch.Size((rows, half_cols * 2))

    def _with_inner(self, fn) -> "NF4Experts":
        return NF4Experts(*(fn(t) for t in self.inner_tensors()), self.compute_dtype)

    def _flat_view(self) -> "NF4Experts":
        return NF4Experts(self.packed.view(-1), self.absmax_q, self.nested_absmax, self.offset, self.compute_dtype)

    def __repr__(self) -> str:
        return (f"NF4Experts(experts={self.num_experts}, expert_shape={tuple(self.expert_shape)}, "
                f"device={self.device}, compute_dtype={self.compute_dtype})")

    def expert(self, index: int) -> NF4Tensor:
        """Expert `index` as a whole 2-D NF4 weight (views of this tensor's storage)."""
        return NF4Tensor(self.packed[index], self.absmax_q[index], self.nested_absmax[index], self.offset[index],
                         self.compute_dtype)

    # ---- FSDP2 all-gather extension -------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if mesh.size() == 1:
            # torch 2.13's FSDP2 copies only the first all-gather input for a group of one rank
            # (see NF4Tensor); the constants are local then and ride in the metadata.
            return (self.packed,), (self.compute_dtype, (self.absmax_q, self.nested_absmax, self.offset))
        return self.inner_tensors(), (self.compute_dtype, None)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        compute_dtype, local_constants = metadata
        if out is not None:  # FSDP gathered into the storages of the tensors returned last time
            assert isinstance(out, NF4Experts) and out.packed.data_ptr() == all_gather_outputs[0].data_ptr()
            return
        inner = (all_gather_outputs[0], *local_constants) if local_constants is not None else all_gather_outputs
        return NF4Experts(*inner, compute_dtype), tuple(all_gather_outputs)


def empty_nf4_experts(experts: int, rows: int, cols: int, device: torch.device,
                      compute_dtype: torch.dtype = torch.bfloat16) -> NF4Experts:
    """Storage for `experts` NF4 experts of shape ``(rows, cols)``, filled by `set_expert`."""
    blocks = rows * cols // 64
    return NF4Experts(torch.zeros(experts, rows, cols // 2, dtype=torch.uint8, device=device),
                      torch.zeros(experts, blocks, dtype=torch.uint8, device=device),
                      torch.zeros(experts, -(-blocks // 256), dtype=torch.float32, device=device),
                      torch.zeros(experts, 1, dtype=torch.float32, device=device), compute_dtype)


def set_expert(experts: NF4Experts, index: int, weight: torch.Tensor) -> None:
    """Quantize one expert's 2-D weight (as bitsandbytes quantizes it alone) into slot `index`."""
    if tuple(weight.shape) != tuple(experts.expert_shape):
        raise ValueError(f"expert weight of shape {tuple(weight.shape)} does not fit {tuple(experts.expert_shape)}")
    quantized = quantize_nf4(weight, experts.compute_dtype)
    for slot, value in zip(experts.inner_tensors(), quantized.inner_tensors()):
        slot[index].copy_(value.view(slot[index].shape))


def quantize_nf4_experts(weights: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> NF4Experts:
    """A whole ``(experts, rows, cols)`` stack, each expert quantized on its own."""
    result = empty_nf4_experts(*weights.shape, device=weights.device, compute_dtype=compute_dtype)
    for index in range(weights.shape[0]):
        set_expert(result, index, weights[index])
    return result
