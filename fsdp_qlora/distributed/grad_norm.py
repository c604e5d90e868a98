"""Gradient clipping over FSDP2's sharded adapter gradients, on the local shards.

torch's `clip_grad_norm_` on DTensor gradients gets the same global norm, but every op goes through
DTensor's dispatch and the norm's reduction through its functional collectives: ~1.2 ms of a 24 ms
tiny-model step on this CPU, against ~0.3 ms for the same ops on plain tensors (docs/benchmarks.md).
Here each rank sums the squares of its own shards (foreach norms, in float64), the sums are
all-reduced over the mesh dimensions that split the gradients (none when they are replicated),
and the local shards are scaled in place: the norm and the clipping of torch's
`clip_grad_norm_` (coefficient max_norm / (norm + 1e-6), applied when below 1).

On CPU under ``--sharding fsdp`` the squared norm needs no collective of its own
(`ReducedSquares`): gloo reduce-scatters by all-reducing the whole gradient buffer (its profile
shows ``gloo:all_reduce`` inside FSDP2's reduce-scatter), so every rank already holds every reduced
gradient for a moment. FSDP2's public `set_custom_reduce_scatter` lets the all-reduce be ours, and
the squares are summed from that buffer before the rank keeps its chunk: the same collective,
one fewer per step (each costs 0.5-2 ms of a ~25 ms tiny-llama step on the 2-core CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from fsdp_qlora.distributed import pair


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   reduced_squares: torch.Tensor | None = None) -> float:
    """Global L2 norm of the (sharded) gradients of `params`; clips them to `max_norm` when > 0.
    `reduced_squares`: their sum of squares, taken from this step's gradient reduction
    (`ReducedSquares.take`), when the gradients are still exactly what it reduced."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = reduced_squares
    if squares is None:
        # float64, like `ReducedSquares`: every layout then clips by the same coefficient (its fp32
        # rounding), and trains bit for bit alike (test_speed_options)
        squares = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float64)).square().sum()
        for group in _splitting_groups(grads[0]):
            dist.all_reduce(squares, group=group)
    total = float(squares.sqrt())
    coefficient = max_norm / (total + 1e-6)
    if max_norm > 0 and coefficient < 1.0:  # a non-finite norm compares False: the loop skips the step
        torch._foreach_mul_(local, coefficient)
    return total


def _splitting_groups(grad: torch.Tensor) -> list:
    """The process groups of the mesh dimensions that shard `grad` over more than one rank (FSDP2 gives
    every adapter gradient the same placements)."""
    if not isinstance(grad, DTensor):
        return []
    mesh = grad.device_mesh
    return [mesh.get_group(dim) for dim, placement in enumerate(grad.placements)
            if isinstance(placement, Shard) and mesh.size(dim) > 1]


class ReducedSquares(pair.FSDPComm):
    """FSDP2's reduce-scatter for CPU (gloo) that also sums the squares of the reduced gradients.

    Installed on every unit of a model sharded over one dimension (``--sharding fsdp``) by
    `distributed.sharding.shard_model`, and read once per step by `clip_grad_norm`. The reduction
    is one all-reduce of the whole gradient buffer, as gloo's own reduce-scatter does; every rank
    then holds the same reduced gradients (zeros in the padding), sums their squares in float64, and
    keeps its own chunk. FSDP2 calls `allocate` and the instance: its ``Comm`` / ``ReduceScatter``
    interface, which torch does not export, so this duck-types it.
    """

    def __init__(self) -> None:
        self._squares: torch.Tensor | None = None

    def take(self) -> torch.Tensor | None:
        """The squares summed since the last call (None when nothing was reduced), and reset."""
        squares, self._squares = self._squares, None
        return squares

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False) -> dist.Work | None:
        if async_op:  # FSDP2 does not ask for it (it waits); kept correct, without the squares
            self._squares = None
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=True)
        pair.all_reduce(input_tensor, group, op)  # over two ranks one exchange (distributed/pair.py)
        self._add_squares(input_tensor)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[dist.get_rank(group)].view_as(output_tensor))
        return None

    def _add_squares(self, reduced: torch.Tensor) -> None:
        # In float64 over 64 Ki-element pieces: a float64 copy of the whole buffer at once (what
        # `vector_norm(reduced, dtype=float64)` makes) cost 7 ms of a SmolLM2 step for its 9.8 MB,
        # mostly page faults of the fresh allocation; the pieces' copies stay small (torch.profiler).
        pieces = reduced.view(-1).split(1 << 16)
        squares = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float64)).square().sum()
        self._squares = squares if self._squares is None else self._squares + squares
