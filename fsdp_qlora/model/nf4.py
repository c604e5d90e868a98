"""NF4 weights as a uint8 tensor that FSDP2 shards and all-gathers byte-exactly.

`NF4Tensor` is a wrapper tensor subclass whose logical shape is the packed weight,
``(out_features, in_features // 2)`` uint8 (two 4-bit codes per byte, row-major, exactly
bitsandbytes' packing). Behind it sit the quantization constants of NF4 with double
quantization: the per-64-element absmax, itself quantized to uint8 in blocks of 256 with a
float32 offset and nested absmax.

Quantization unit = the whole weight, at every world size. Double quantization subtracts the
*mean* of all first-level absmax values and quantizes the result in groups of 256 blocks, so the
second-level constants depend on the whole tensor. Each rank still reads and quantizes only the
rows it owns: the 4-bit codes and first-level absmax of a row block are local, and the ranks
all-gather the first-level absmax (1/16 of the bf16 weight's bytes, fp32) to compute the mean and
the nested absmax exactly as bitsandbytes does on the whole weight (`quantize_nf4_rows`). A
shard therefore holds its rows' codes and 8-bit absmax plus the whole weight's nested absmax
and offset (replicated: 1/8192 of the bf16 weight per rank), and the 1-process model, `--sharding
ddp`, FSDP on N ranks and HSDP hold the same bytes, byte-identical to
`bnb.functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")`.

FSDP2's all-gather extension (`fsdp_pre_all_gather` / `fsdp_post_all_gather`) moves the packed
bytes and every constant as their own integer/float32 buffers: nothing is ever cast through a
16-bit float (bitsandbytes issue #1945: bf16 containers may normalize NaN bit patterns), the
storage dtype is independent of the mixed-precision dtype, and the constants are sharded
rather than replicated on every rank.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

# bitsandbytes' CPU backend warns at import that it cannot fetch an optional hub kernel
# (never possible offline), and `kernels` (>= 0.19, which it asks) that it skips a trust check
# offline; the NF4 path here does not use that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbf  # noqa: E402

from fsdp_qlora.layout import NESTED_BLOCKSIZE, NF4_BLOCKSIZE  # noqa: E402

aten = torch.ops.aten


class PackedNF4(torch.Tensor):
    """What every packed NF4 parameter shares: uint8 bytes behind a wrapper tensor, inner tensors that
    FSDP2, DTensor and nn.Parameter handle through the few aten ops below (`_DISPATCH`), and no
    autograd through the tensor itself (the weight is frozen). `NF4Tensor` is one 2-D weight;
    `NF4Experts` (model/nf4_experts.py) is a stack of them, one quantization unit per expert."""

    packed: torch.Tensor
    absmax_q: torch.Tensor
    nested_absmax: torch.Tensor
    offset: torch.Tensor
    compute_dtype: torch.dtype

    @staticmethod
    def __new__(cls, packed, absmax_q, nested_absmax, offset, compute_dtype, *args):
        return torch.Tensor._make_wrapper_subclass(cls, packed.shape, dtype=torch.uint8, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed, absmax_q, nested_absmax, offset, compute_dtype, *args):
        self.packed = packed
        self.absmax_q = absmax_q
        self.nested_absmax = nested_absmax
        self.offset = offset
        self.compute_dtype = compute_dtype

    def inner_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.packed, self.absmax_q, self.nested_absmax, self.offset

    def _with_inner(self, fn) -> "PackedNF4":
        raise NotImplementedError

    def _flat_view(self) -> "PackedNF4":
        """The same tensor with a flat `packed` (FSDP2's flat view of a sharded parameter)."""
        raise NotImplementedError

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is None:
            raise NotImplementedError(f"{cls.__name__} does not support {func}; dequantize() first")
        return handler(*args, **kwargs)

    # The weight is frozen: no autograd graph ever goes through it as a tensor.
    __torch_function__ = torch._C._disabled_torch_function_impl


class NF4Tensor(PackedNF4):
    """Packed NF4 weight, shape ``(rows, in_features // 2)`` uint8, with its quant constants.

    Inner tensors (all on the same device):
      packed        uint8 (rows, in_features // 2)  two NF4 codes per byte, these rows
      absmax_q      uint8 (rows * in_features // 64,)  these rows' first-level absmax, quantized
      nested_absmax fp32  (ceil(whole weight's blocks / 256),)  second-level absmax, whole weight
      offset        fp32  (1,)  mean subtracted from the whole weight's absmax
    `first_block` is the index of ``absmax_q[0]`` among the whole weight's 64-element blocks
    (0 for a whole weight; a shard's row offset times in_features / 64). Constants shared by
    every weight (the NF4 and dynamic code books) are not per-tensor data.
    """

    first_block: int

    def __init__(self, packed, absmax_q, nested_absmax, offset, compute_dtype, first_block=0):
        super().__init__(packed, absmax_q, nested_absmax, offset, compute_dtype)
        self.first_block = first_block

    # ---- geometry -------------------------------------------------------------------------
    @property
    def weight_shape(self) -> torch.Size:
        rows, half_cols = self.packed.shape
        return torch.Size((rows, half_cols * 2))

    def _with_inner(self, fn) -> "NF4Tensor":
        return NF4Tensor(*(fn(t) for t in self.inner_tensors()), self.compute_dtype, self.first_block)

    def _flat_view(self) -> "NF4Tensor":
        return NF4Tensor(self.packed.view(-1), self.absmax_q, self.nested_absmax, self.offset, self.compute_dtype,
                         self.first_block)

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(weight_shape={tuple(self.weight_shape)}, first_block={self.first_block}, "
            f"device={self.device}, compute_dtype={self.compute_dtype})"
        )

    # ---- math -----------------------------------------------------------------------------
    def dequantize_absmax(self) -> torch.Tensor:
        """First-level absmax in fp32, with bitsandbytes' own kernel (as its dequantize_4bit does).

        A shard's blocks may start inside a nested group of 256: its codes are preceded by
        `first_block % 256` placeholders so that bitsandbytes' blockwise kernel, which starts a
        group at index 0, pairs every code with its group's nested absmax; the placeholders'
        values are then dropped. Each value is code * nested absmax (+ offset), computed
        elementwise, so a shard's absmax equals the whole weight's at the same blocks, bit for bit.
        """
        lead = self.first_block % NESTED_BLOCKSIZE
        codes = self.absmax_q
        if lead:
            codes = torch.cat([codes.new_zeros(lead), codes])
        group = self.first_block // NESTED_BLOCKSIZE
        nested = self.nested_absmax[group: group + -(-codes.numel() // NESTED_BLOCKSIZE)]
        # bitsandbytes' operator itself, as `bnbf.dequantize_blockwise` calls it, without that wrapper's
        # QuantState and checks: a step calls this once per weight and matmul, and on a small model
        # the Python around the kernel costs as much as the kernel.
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(codes, nested, _dynamic_code(self.device),
                                                                      NESTED_BLOCKSIZE, torch.float32)
        return (absmax[lead:] if lead else absmax) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight ``(rows, in_features)`` in `dtype` (default compute dtype)."""
        dtype = dtype or self.compute_dtype
        if torch.compiler.is_compiling():
            # Under torch.compile (--compile) one opaque node of the graph, the registered op below,
            # instead of dynamo tracing bitsandbytes' Python (QuantState and friends) at every call.
            return torch.ops.fsdp_qlora.dequantize_nf4(*self.inner_tensors(), self.first_block, dtype)
        return self._dequantize(dtype)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # As `bnbf.dequantize_4bit` calls the operator (the same kernel, bytes and result), minus the wrapper.
        return torch.ops.bitsandbytes.dequantize_4bit.default(self.packed.view(-1, 1), self.dequantize_absmax(),
                                                              NF4_BLOCKSIZE, "nf4", self.weight_shape, dtype)

    # ---- FSDP2 all-gather extension -------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        # Only the rows' bytes and 8-bit absmax are sharded; every shard already holds the whole
        # weight's nested absmax and offset, which ride in the (local) metadata.
        whole_constants = (self.nested_absmax, self.offset)
        if mesh.size() == 1:
            # torch 2.13's FSDP2 copies only the first all-gather input when the group has
            # one rank; the 8-bit absmax is local anyway, so it travels in the metadata too.
            return (self.packed,), (self.compute_dtype, self.absmax_q, whole_constants)
        return (self.packed, self.absmax_q), (self.compute_dtype, None, whole_constants)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        compute_dtype, local_absmax_q, (nested_absmax, offset) = metadata
        packed = all_gather_outputs[0]
        if out is not None:
            # FSDP re-allocated the storages of the tensors returned below and gathered into
            # them, so `out` already aliases the fresh bytes.
            assert isinstance(out, NF4Tensor) and out.packed.data_ptr() == packed.data_ptr()
            return
        absmax_q = all_gather_outputs[1] if local_absmax_q is None else local_absmax_q
        return NF4Tensor(packed, absmax_q, nested_absmax, offset, compute_dtype), tuple(all_gather_outputs)


@torch.library.custom_op("fsdp_qlora::dequantize_nf4", mutates_args=())
def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                   first_block: int, dtype: torch.dtype) -> torch.Tensor:
    """`NF4Tensor.dequantize` as an operator torch.compile keeps whole (the same bitsandbytes calls)."""
    return NF4Tensor(packed, absmax_q, nested_absmax, offset, dtype, first_block)._dequantize(dtype)


@dequantize_nf4.register_fake
def _(packed, absmax_q, nested_absmax, offset, first_block, dtype):
    rows, half_cols = packed.shape
    return packed.new_empty((rows, half_cols * 2), dtype=dtype)


# ---- the few aten ops FSDP2, DTensor and nn.Parameter apply to a parameter ----------------
def _same_shape(size, tensor: PackedNF4) -> bool:
    return list(size) == list(tensor.shape)


def _view(tensor: PackedNF4, size) -> Any:
    if _same_shape(size, tensor):
        return tensor._with_inner(lambda t: t)
    if list(size) == [-1]:
        # FSDP2 keeps a flat view of every sharded parameter; for extension tensors it is
        # never read. It must stay a wrapper: FSDP2 compares storages of plain tensors,
        # and a wrapper subclass has none.
        return tensor._flat_view()
    raise NotImplementedError(f"{type(tensor).__name__} cannot be viewed as {list(size)}")


def _as_strided(tensor: PackedNF4, size, stride, storage_offset=0) -> PackedNF4:
    if not _same_shape(size, tensor) or storage_offset != 0:
        raise NotImplementedError(f"{type(tensor).__name__} supports only the identity as_strided")
    return tensor._with_inner(lambda t: t)


def _to_copy(tensor: PackedNF4, dtype=None, device=None, **kwargs) -> PackedNF4:
    if dtype not in (None, torch.uint8):
        raise NotImplementedError("cast an NF4 weight with dequantize(dtype), not .to(dtype)")
    pin = kwargs.get("pin_memory", False)
    return tensor._with_inner(
        lambda t: t.to(device=device, non_blocking=kwargs.get("non_blocking", False))
        if not pin
        else t.to(device=device).pin_memory()
    )


def _copy_(dst: PackedNF4, src: PackedNF4, non_blocking=False) -> PackedNF4:
    if type(src) is not type(dst):
        raise NotImplementedError(f"{type(dst).__name__} can only be copied from another {type(dst).__name__}")
    for d, s in zip(dst.inner_tensors(), src.inner_tensors()):
        d.copy_(s, non_blocking=non_blocking)
    return dst


def _new_zeros(tensor: PackedNF4, size, **kwargs) -> torch.Tensor:
    # Only FSDP padding for uneven shards asks this; we require even sharding instead.
    raise NotImplementedError(f"NF4 weight of shape {tuple(tensor.shape)} must shard evenly over the ranks")


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


def _dynamic_code(device: torch.device) -> torch.Tensor:
    key = ("dynamic", device)
    if key not in _CODE_CACHE:
        _CODE_CACHE[key] = bnbf.create_dynamic_map().to(device)
    return _CODE_CACHE[key]


def quantize_nf4(weight: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> NF4Tensor:
    """A whole weight, exactly as bitsandbytes quantizes it (NF4, blocksize 64, double quantization)."""
    return quantize_nf4_rows(weight, compute_dtype)


AbsmaxGather = Callable[[torch.Tensor], torch.Tensor]


def quantize_nf4_rows(rows: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16,
                      gather_absmax: AbsmaxGather | None = None, first_block: int = 0) -> NF4Tensor:
    """One rank's rows of a weight, quantized exactly as bitsandbytes quantizes the whole weight.

    `gather_absmax` concatenates every shard's first-level absmax in row order (an all-gather
    over the ranks that split the weight; None when `rows` is the whole weight); `first_block` is
    the index of this shard's first 64-element block in the whole weight. bitsandbytes'
    `quantize_4bit(compress_statistics=True)` is: per-block absmax and 4-bit codes (local to a
    block), then ``offset = absmax.mean()`` and ``quantize_blockwise(absmax - offset, 256)`` over
    the whole weight. Here the first step runs on the local rows and the second on the gathered
    absmax, with the same calls on the same device, so every byte and constant matches.
    """
    if rows.ndim != 2 or rows.shape[1] % 2 or rows.numel() % NF4_BLOCKSIZE:
        raise ValueError(
            f"NF4 needs a 2-D weight with an even number of columns and a multiple of "
            f"{NF4_BLOCKSIZE} elements; got shape {tuple(rows.shape)}"
        )
    packed, state = bnbf.quantize_4bit(
        rows.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4",
        quant_storage=torch.uint8,
    )
    local_absmax = state.absmax
    whole_absmax = local_absmax if gather_absmax is None else gather_absmax(local_absmax)
    offset = whole_absmax.mean()
    absmax_q, nested = bnbf.quantize_blockwise(whole_absmax - offset, blocksize=NESTED_BLOCKSIZE)
    if gather_absmax is not None:  # keep only this shard's codes (a copy: the rest is freed)
        absmax_q = absmax_q[first_block: first_block + local_absmax.numel()].clone()
    n_rows, cols = rows.shape
    return NF4Tensor(packed.view(n_rows, cols // 2), absmax_q, nested.absmax.to(torch.float32),
                     offset.reshape(1).to(torch.float32), compute_dtype, first_block)


def nf4_row_shard(weight: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    """Rows [start, stop) of a whole quantized weight: the shard a rank owning them holds."""
    cols = weight.weight_shape[1]
    first, last = start * cols // NF4_BLOCKSIZE, stop * cols // NF4_BLOCKSIZE
    return NF4Tensor(weight.packed[start:stop].clone(), weight.absmax_q[first:last].clone(), weight.nested_absmax,
                     weight.offset, weight.compute_dtype, first)


def nf4_bytes(tensor: PackedNF4) -> int:
    """Bytes actually held by the weight and its constants."""
    return sum(t.numel() * t.element_size() for t in tensor.inner_tensors())
