"""`GradientAllReduce` (distributed/replicate.py) on 2 gloo ranks, against the gradients computed by hand.

argv: <result json>. Six fp32 parameters in three buckets (tiny bucket sizes). Each rank runs two
backwards, the first without sync (accumulated locally), the second with it; the loss is
``sum_i c_rank_i * sum(p_i)``, so every gradient is a known constant. Rank 1 uses the parameters in
the opposite order (its buckets become ready last-first, rank 0's first-first: the all-reduces must
still start in bucket order) and leaves one parameter out of the synced backward (no gradient from
it there: it counts as zeros). Rank 0 writes whether each averaged gradient equals the expected one.
"""

import json
import sys

import torch
import torch.distributed as dist

from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.replicate import GradientAllReduce

SHAPES = [(3, 4), (5,), (2, 2), (7, 3), (1,), (4, 4)]
UNUSED_ON_RANK_1 = 2  # this parameter gets no gradient from rank 1's synced backward


def coefficient(rank: int, index: int, backward: int) -> float:
    return 1.0 + rank * 10 + index + backward * 100


def loss(params, rank: int, backward: int) -> torch.Tensor:
    order = range(len(params)) if rank == 0 else reversed(range(len(params)))
    terms = [coefficient(rank, i, backward) * params[i].sum() for i in order
             if not (rank == 1 and backward == 1 and i == UNUSED_ON_RANK_1)]
    return torch.stack(terms).sum()


def main() -> None:
    env = init_distributed()
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    reducer = GradientAllReduce(params, first_bytes=16, bytes_per_bucket=40)
    index_of = {id(p): i for i, p in enumerate(params)}
    buckets = [[index_of[id(p)] for p in bucket] for bucket in reducer.buckets]
    reducer.requires_sync = False
    loss(params, env.rank, 0).backward()
    local_after_first = [p.grad.clone() for p in params]  # not reduced: this rank's own
    reducer.requires_sync = True
    loss(params, env.rank, 1).backward()
    expected = []
    for i in range(len(params)):
        per_rank = [coefficient(r, i, 0) + (0 if (r == 1 and i == UNUSED_ON_RANK_1) else coefficient(r, i, 1))
                    for r in range(2)]
        expected.append(sum(per_rank) / 2)
    result = {
        "buckets": buckets,
        "first_backward_local": all(torch.all(g == coefficient(env.rank, i, 0)) for i, g in enumerate(local_after_first)),
        "mean": [bool(torch.all(p.grad == e)) for p, e in zip(params, expected)],
    }
    # a third backward, synced, from zero gradients: the reducer is ready again after each
    for p in params:
        p.grad = None
    loss(params, env.rank, 0).backward()
    result["again"] = [bool(torch.all(p.grad == (coefficient(0, i, 0) + coefficient(1, i, 0)) / 2))
                       for i, p in enumerate(params)]
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if env.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(gathered, f)
    shutdown()


if __name__ == "__main__":
    main()
