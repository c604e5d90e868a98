"""NF4 weights as a uint8 tensor that FSDP2 shards and all-gathers byte-exactly.

`NF4Tensor` is a wrapper tensor subclass whose logical shape is the packed weight,
``(out_features, in_features // 2)`` uint8 (two 4-bit codes per byte, row-major, exactly
bitsandbytes' packing). Behind it sit the quantization constants of NF4 with double
quantization: the per-64-element absmax, itself quantized to uint8 in blocks of 256 with a
float32 offset and nested absmax.

Quantization unit = one slice of rows. bitsandbytes' double quantization subtracts the *mean*
of all first-level absmax values before quantizing them, so the constants of a block depend on
the whole tensor. To let each rank quantize only the rows it owns (never seeing the full
weight), every FSDP shard is quantized independently by `bnb.functional.quantize_4bit`: a
sharded tensor holds one slice; an all-gathered tensor holds ``num_slices`` equal slices, each
with its own offset and nested absmax. At world size 1 the single slice is exactly
bitsandbytes' quantization of the whole weight; at world size N it is bitsandbytes'
quantization of each of the N row blocks (4-bit codes and first-level absmax are identical
either way; only the second-level statistics differ, and they are finer per slice).

FSDP2's all-gather extension (`fsdp_pre_all_gather` / `fsdp_post_all_gather`) moves the packed
bytes and every constant as their own integer/float32 buffers: nothing is ever cast through a
16-bit float (bitsandbytes issue #1945: bf16 containers may normalize NaN bit patterns), the
storage dtype is independent of the mixed-precision dtype, and the constants are sharded
rather than replicated on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

# bitsandbytes' CPU backend warns at import that it cannot fetch an optional hub kernel
# (never possible offline); the NF4 path here does not use that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbf  # noqa: E402

aten = torch.ops.aten

NF4_BLOCKSIZE = 64  # elements per first-level absmax
NESTED_BLOCKSIZE = 256  # first-level absmax values per nested (second-level) absmax


class NF4Tensor(torch.Tensor):
    """Packed NF4 weight, shape ``(rows, in_features // 2)`` uint8, with its quant constants.

    Inner tensors (all on the same device):
      packed        uint8 (rows, in_features // 2)  two NF4 codes per byte
      absmax_q      uint8 (num_slices * blocks_per_slice,)  first-level absmax, quantized
      nested_absmax fp32  (num_slices * nested_per_slice,)  second-level absmax
      offset        fp32  (num_slices,)  mean subtracted from each slice's absmax
    Constants shared by every weight (the NF4 and dynamic code books) are not per-tensor data.
    """

    packed: torch.Tensor
    absmax_q: torch.Tensor
    nested_absmax: torch.Tensor
    offset: torch.Tensor
    compute_dtype: torch.dtype

    @staticmethod
    def __new__(cls, packed, absmax_q, nested_absmax, offset, compute_dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, packed.shape, dtype=torch.uint8, device=packed.device, requires_grad=False
        )

    def __init__(self, packed, absmax_q, nested_absmax, offset, compute_dtype):
        self.packed = packed
        self.absmax_q = absmax_q
        self.nested_absmax = nested_absmax
        self.offset = offset
        self.compute_dtype = compute_dtype

    # ---- geometry -------------------------------------------------------------------------
    @property
    def weight_shape(self) -> torch.Size:
        rows, half_cols = self.packed.shape
        return torch.Size((rows, half_cols * 2))

    @property
    def num_slices(self) -> int:
        return self.offset.numel()

    def inner_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.packed, self.absmax_q, self.nested_absmax, self.offset

    def _with_inner(self, fn) -> "NF4Tensor":
        return NF4Tensor(*(fn(t) for t in self.inner_tensors()), self.compute_dtype)

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(weight_shape={tuple(self.weight_shape)}, slices={self.num_slices}, "
            f"device={self.device}, compute_dtype={self.compute_dtype})"
        )

    # ---- math -----------------------------------------------------------------------------
    def dequantize_absmax(self) -> torch.Tensor:
        """First-level absmax in fp32, per slice exactly as bitsandbytes' dequantize_4bit does."""
        slices = self.num_slices
        blocks_per_slice = self.absmax_q.numel() // slices
        nested_per_slice = self.nested_absmax.numel() // slices
        code = _dynamic_code(self.device)
        if blocks_per_slice % NESTED_BLOCKSIZE == 0 or slices == 1:
            # Nested blocks never straddle a slice boundary: one kernel call for all slices.
            state = bnbf.QuantState(
                absmax=self.nested_absmax, code=code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
            absmax = bnbf.dequantize_blockwise(self.absmax_q, state)
            return absmax + self.offset.repeat_interleave(blocks_per_slice)
        parts = []
        for i in range(slices):
            state = bnbf.QuantState(
                absmax=self.nested_absmax[i * nested_per_slice : (i + 1) * nested_per_slice],
                code=code,
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            q = self.absmax_q[i * blocks_per_slice : (i + 1) * blocks_per_slice]
            parts.append(bnbf.dequantize_blockwise(q, state) + self.offset[i])
        return torch.cat(parts)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight ``(rows, in_features)`` in `dtype` (default compute dtype)."""
        state = bnbf.QuantState(
            absmax=self.dequantize_absmax(),
            shape=self.weight_shape,
            code=_nf4_code(self.device),
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=dtype or self.compute_dtype,
        )
        return bnbf.dequantize_4bit(self.packed.view(-1, 1), state)

    # ---- FSDP2 all-gather extension -------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if self.num_slices != 1:
            raise RuntimeError("an FSDP shard of an NF4 weight must be one quantization slice")
        if mesh.size() == 1:
            # torch 2.13's FSDP2 copies only the first all-gather input when the group has
            # one rank; the constants are local anyway, so they travel in the metadata.
            return (self.packed,), (self.compute_dtype, (self.absmax_q, self.nested_absmax, self.offset))
        return self.inner_tensors(), (self.compute_dtype, None)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        compute_dtype, local_constants = metadata
        packed = all_gather_outputs[0]
        if out is not None:
            # FSDP re-allocated the storages of the tensors returned below and gathered into
            # them, so `out` already aliases the fresh bytes.
            assert isinstance(out, NF4Tensor) and out.packed.data_ptr() == packed.data_ptr()
            return
        constants = local_constants or all_gather_outputs[1:]
        return NF4Tensor(packed, *constants, compute_dtype), tuple(all_gather_outputs)

    # ---- the few aten ops FSDP2, DTensor and nn.Parameter apply to a parameter ------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is None:
            raise NotImplementedError(f"NF4Tensor does not support {func}; dequantize() first")
        return handler(*args, **kwargs)

    # The weight is frozen: no autograd graph ever goes through it as a tensor.
    __torch_function__ = torch._C._disabled_torch_function_impl


def _same_shape(size, tensor: NF4Tensor) -> bool:
    return list(size) == list(tensor.shape)


def _view(tensor: NF4Tensor, size) -> Any:
    if _same_shape(size, tensor):
        return tensor._with_inner(lambda t: t)
    if list(size) == [-1]:
        # FSDP2 keeps a flat view of every sharded parameter; for extension tensors it is
        # never read. It must stay an NF4Tensor: FSDP2 compares storages of plain tensors,
        # and a wrapper subclass has none.
        return NF4Tensor(tensor.packed.view(-1), tensor.absmax_q, tensor.nested_absmax, tensor.offset,
                         tensor.compute_dtype)
    raise NotImplementedError(f"NF4Tensor cannot be viewed as {list(size)}")


def _as_strided(tensor: NF4Tensor, size, stride, storage_offset=0) -> NF4Tensor:
    if not _same_shape(size, tensor) or storage_offset != 0:
        raise NotImplementedError("NF4Tensor supports only the identity as_strided")
    return tensor._with_inner(lambda t: t)


def _to_copy(tensor: NF4Tensor, dtype=None, device=None, **kwargs) -> NF4Tensor:
    if dtype not in (None, torch.uint8):
        raise NotImplementedError("cast an NF4Tensor with dequantize(dtype), not .to(dtype)")
    pin = kwargs.get("pin_memory", False)
    return tensor._with_inner(
        lambda t: t.to(device=device, non_blocking=kwargs.get("non_blocking", False))
        if not pin
        else t.to(device=device).pin_memory()
    )


def _copy_(dst: NF4Tensor, src: NF4Tensor, non_blocking=False) -> NF4Tensor:
    if not isinstance(src, NF4Tensor):
        raise NotImplementedError("NF4Tensor can only be copied from another NF4Tensor")
    for d, s in zip(dst.inner_tensors(), src.inner_tensors()):
        d.copy_(s, non_blocking=non_blocking)
    return dst


def _new_zeros(tensor: NF4Tensor, size, **kwargs) -> torch.Tensor:
    # Only FSDP padding for uneven shards asks this; we require even sharding instead.
    raise NotImplementedError(
        f"NF4 weight of shape {tuple(tensor.weight_shape)} must shard evenly over the ranks"
    )


_DISPATCH = {
    aten.detach.default: lambda t: t._with_inner(lambda x: x),
    aten.alias.default: lambda t: t._with_inner(lambda x: x),
    aten.clone.default: lambda t, **kw: t._with_inner(lambda x: x.clone()),
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.new_zeros.default: _new_zeros,
    aten.is_pinned.default: lambda t, device=None: t.packed.is_pinned(),
    aten._pin_memory.default: lambda t, device=None: t._with_inner(lambda x: x.pin_memory()),
}


# ---- quantization -------------------------------------------------------------------------
_CODE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    key = ("nf4", device)
    if key not in _CODE_CACHE:
        _CODE_CACHE[key] = bnbf.get_4bit_type("nf4", device=device)
    return _CODE_CACHE[key]


def _dynamic_code(device: torch.device) -> torch.Tensor:
    key = ("dynamic", device)
    if key not in _CODE_CACHE:
        _CODE_CACHE[key] = bnbf.create_dynamic_map().to(device)
    return _CODE_CACHE[key]


def quantize_nf4(weight: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> NF4Tensor:
    """Quantize one slice of rows with bitsandbytes (NF4, blocksize 64, double quantization)."""
    if weight.ndim != 2 or weight.shape[1] % 2 or weight.numel() % NF4_BLOCKSIZE:
        raise ValueError(
            f"NF4 needs a 2-D weight with an even number of columns and a multiple of "
            f"{NF4_BLOCKSIZE} elements; got shape {tuple(weight.shape)}"
        )
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )
    rows, cols = weight.shape
    return NF4Tensor(
        packed.view(rows, cols // 2),
        state.absmax,
        state.state2.absmax.to(torch.float32),
        state.offset.reshape(1).to(torch.float32),
        compute_dtype,
    )


def nf4_bytes(tensor: NF4Tensor) -> int:
    """Bytes actually held by the weight and its constants."""
    return sum(t.numel() * t.element_size() for t in tensor.inner_tensors())
