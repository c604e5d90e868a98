"""``--sharding ddp``: the adapters replicated on every rank outside FSDP2, their gradients all-reduced
in buckets while backward still runs.

Every rank holds the whole model (the NF4 base and the fp32 adapters, identical from the same seed),
computes its micro-batches, and `GradientAllReduce` averages the adapter gradients over the ranks:

* the adapters are split into buckets in the reverse of their registration order (the order backward
  produces their gradients); a bucket's all-reduce starts, asynchronously, as soon as its last
  gradient is accumulated (`register_post_accumulate_grad_hook`), so it overlaps the backward of
  the layers below;
* buckets start in index order on every rank, whatever order the gradients arrive in: collectives
  pair up by order, so a rank must never start bucket 2 before bucket 1;
* at the end of backward (a callback queued on autograd's engine) the rest start, all are waited
  for, and each gradient becomes the mean over the ranks. After that every rank holds the same
  gradients: clipping needs no collective and the optimizer updates identical copies.

Why not FSDP2 with a dp_shard of one rank, what this layout was before (docs/benchmarks.md, issue
16): FSDP2 then copies every adapter into an all-gather buffer and out again at every step (casting it
to the compute dtype), runs its hooks, and reduces the gradients in one blocking collective after the
last layer's backward. Without it a tiny-llama step on 2 CPU ranks is ~16% faster (same losses,
bit for bit: tests/test_speed_options.py).

Why not torch's `DistributedDataParallel`: it only prepares its reduction when its own `forward`
runs, and the chunked loss calls the decoder and lm_head apart (train/loss.py); it broadcasts every
parameter and buffer at construction (the whole base, unless `init_sync=False`); its state dict
prefixes ``module.``. What this layout needs of it is the bucketed, ordered all-reduce below.

Gradient accumulation: with `requires_sync` off the hooks do nothing and gradients accumulate
locally; the last micro-batch's backward (sync on) reduces the sums, as FSDP2's
`set_requires_gradient_sync` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from fsdp_qlora.distributed import pair

# DistributedDataParallel's bucket sizes: a small first bucket, so that the first all-reduce starts
# early in backward, then 25 MiB (`bucket_cap_mb`), tuned for NCCL. gloo (CPU) gets 1 MiB buckets
# throughout: SmolLM2-135M's 9.8 MiB of adapter gradients in 10 buckets left 3-10 ms of all-reduce to
# wait for at the end of backward, against 15-30 ms in DDP's two, and ran 2-4% faster (2 CPU ranks,
# 2 runs each; 4 MiB buckets in between). Tiny-llama's 256 KiB stay one bucket: 64 KiB buckets (4
# all-reduces) were 8% slower, each gloo collective costing ~0.5 ms here.
FIRST_BUCKET_BYTES = 1 << 20
BUCKET_BYTES = 25 << 20
GLOO_BUCKET_BYTES = 1 << 20


def bucket_params(params: list[nn.Parameter], first_bytes: int = FIRST_BUCKET_BYTES,
                  bytes_per_bucket: int = BUCKET_BYTES) -> list[list[nn.Parameter]]:
    """`params` in reverse order (backward's), cut into buckets of at least the given sizes (the last
    one smaller)."""
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for param in reversed(params):
        buckets[-1].append(param)
        size += param.numel() * param.element_size()
        if size >= (first_bytes if len(buckets) == 1 else bytes_per_bucket):
            buckets.append([])
            size = 0
    return [bucket for bucket in buckets if bucket]


class GradientAllReduce:
    """Averages the gradients of `params` over `group` during backward (see the module docstring)."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None = None,
                 first_bytes: int = FIRST_BUCKET_BYTES, bytes_per_bucket: int = BUCKET_BYTES):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.requires_sync = True
        self.buckets = bucket_params(params, first_bytes, bytes_per_bucket)
        self._bucket_of = {param: index for index, bucket in enumerate(self.buckets) for param in bucket}
        for param in self._bucket_of:
            param.register_post_accumulate_grad_hook(self._gradient_ready)
        self._start_backward()

    def _start_backward(self) -> None:
        self._waiting = [len(bucket) for bucket in self.buckets]  # gradients each bucket still waits for
        self._next = 0  # the next bucket to start
        self._started: list[tuple[int, torch.Tensor, dist.Work]] = []
        self._finish_queued = False

    def _gradient_ready(self, param: nn.Parameter) -> None:
        if not self.requires_sync:
            return
        if not self._finish_queued:  # once per backward, from its first adapter gradient
            Variable._execution_engine.queue_callback(self._finish)
            self._finish_queued = True
        self._waiting[self._bucket_of[param]] -= 1
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            self._start(self._next)

    def _start(self, index: int) -> None:
        # A parameter that got no gradient on this rank counts as zeros (other ranks may have one).
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[index]])
        self._started.append((index, flat, pair.all_reduce(flat, self.group, async_op=True)))
        self._next = index + 1

    def _finish(self) -> None:
        while self._next < len(self.buckets):  # buckets with a parameter whose hook never ran
            self._start(self._next)
        for index, flat, work in self._started:
            work.wait()
            flat.div_(self.world_size)  # the sum over ranks -> the mean (gloo has no AVG)
            for param, grad in zip(self.buckets[index], flat.split([p.numel() for p in self.buckets[index]])):
                if param.grad is None:
                    param.grad = grad.view_as(param)
                else:
                    param.grad.copy_(grad.view_as(param))
        self._start_backward()


def replicate_adapters(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Average `model`'s trainable parameters' gradients over `group` in every backward whose last
    micro-batch syncs (`set_gradient_sync`); the reducer is `model.gradient_all_reduce`."""
    bucket_bytes = GLOO_BUCKET_BYTES if dist.get_backend(group) == "gloo" else BUCKET_BYTES
    model.gradient_all_reduce = GradientAllReduce([p for p in model.parameters() if p.requires_grad], group,
                                                  bytes_per_bucket=bucket_bytes)
    return model
