"""Collectives over two gloo ranks as one exchange of messages.

gloo runs an all-reduce as a ring, in several rounds of messages, whatever the world size. Between
two ranks one exchange does it: each rank sends its buffer, receives the other's and adds. On the
2-core CPU (two processes, gloo over loopback) an all-reduce of 256 KiB (tiny-llama's adapter
gradients) took 1.87 ms through gloo and 0.21-0.30 ms as an exchange; 9.8 MB (SmolLM2-135M's) took
6.1 against 5.2 ms. An all-gather of 128 KiB took 0.5 ms through gloo (docs/benchmarks.md).

The results are gloo's bits: IEEE addition is commutative, so both ranks compute the same a + b as
the ring does, and the mean is that sum divided by two, as gloo's ``AVG``. Only for gloo: NCCL's
collectives are already one kernel, and on more than two ranks the ring is what scales.

Two ranks on one host exchange through shared memory instead (distributed/shared_pair.py), which
needs no gloo thread to be scheduled; each exchange then completes where it starts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fsdp_qlora.distributed.shared_pair import SharedPair, open_channel

# A group's shared-memory channel (None: gloo serves it), opened at its first exchange (`_channel`).
_CHANNELS: dict[dist.ProcessGroup, SharedPair | None] = {}


def is_pair(group: dist.ProcessGroup | None) -> bool:
    """Whether `group` (None: the default group) is two ranks on gloo."""
    return dist.get_world_size(group) == 2 and dist.get_backend(group) == "gloo"


def _exchange(send: torch.Tensor, receive: torch.Tensor, group: dist.ProcessGroup | None) -> list[dist.Work]:
    group = group or dist.group.WORLD
    peer = dist.get_global_rank(group, 1 - dist.get_rank(group))
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer, group),
                                   dist.P2POp(dist.irecv, receive, peer, group)])


def _channel(group: dist.ProcessGroup | None) -> SharedPair | None:
    """The pair's shared-memory channel, opened at the first call (a collective), or None."""
    group = group or dist.group.WORLD
    if group not in _CHANNELS:
        _CHANNELS[group] = open_channel(group)
    return _CHANNELS[group]


def exchange(send: torch.Tensor, receive: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """`send` to the other rank of the pair, its `send` into `receive`, completed before returning:
    through shared memory when the pair shares a host, else through gloo."""
    channel = _channel(group)
    if channel is not None:
        channel.exchange(send, receive)
        return
    for work in _exchange(send, receive, group):
        work.wait()


def _combine(tensor: torch.Tensor, received: torch.Tensor, average: bool) -> None:
    tensor.add_(received)
    if average:
        tensor.div_(2)  # gloo's AVG: the sum over the ranks, divided by their count


class PairSum:
    """The sum (or, with `average`, the mean) of `tensor` over a pair, started; `wait()` completes it
    in place (a Work's interface). Exchanges of one pair are matched in the order they start, like
    collectives."""

    def __init__(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None, average: bool = False):
        self.tensor = tensor
        self._average = average
        self._received = torch.empty_like(tensor)
        self._works = _exchange(tensor, self._received, group)

    def wait(self) -> bool:
        if self._works:
            for work in self._works:  # the send too: `tensor` is about to change
                work.wait()
            self._works = []
            _combine(self.tensor, self._received, self._average)
        return True


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, op=dist.ReduceOp.SUM,
               async_op: bool = False):
    """``dist.all_reduce`` of `tensor` over `group`; a SUM or AVG of a host tensor over a gloo pair is
    one exchange."""
    if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) or not is_pair(group) or tensor.device.type != "cpu":
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)
    if async_op and _channel(group) is None:
        return PairSum(tensor, group, average=op == dist.ReduceOp.AVG)
    # Through shared memory even when asked for asynchronously: done now, at the point where both
    # ranks start it (the order they start in is the order that pairs them up), and gloo's thread
    # need not get a core while both ranks compute.
    received = torch.empty_like(tensor)
    exchange(tensor, received, group)
    _combine(tensor, received, op == dist.ReduceOp.AVG)
    return _COMPLETED if async_op else None


class _Completed:
    """The Work of a collective that completed when it started."""

    def wait(self) -> bool:
        return True


_COMPLETED = _Completed()


class FSDPComm:
    """The buffer half of FSDP2's ``Comm`` interface (which torch does not export: duck-typed):
    plain tensors, as FSDP2's own default allocates on CPU."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class PairAllGather(FSDPComm):
    """FSDP2's all-gather (`set_custom_all_gather`) for units over a gloo pair: this rank's input goes
    into its half of the output, the other rank's arrives into the other half. FSDP2 calls `allocate`
    and the instance (its ``AllGather`` interface)."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        if async_op:  # FSDP2 asks for it only from an explicit `unshard(async_op=True)`: gloo's own
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=True)
        halves = output_tensor.view(2, -1)
        rank = dist.get_rank(group)
        halves[rank].copy_(input_tensor.view(-1))
        exchange(input_tensor, halves[1 - rank], group)
        return None
