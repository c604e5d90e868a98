"""distributed/pair.py on 2 gloo ranks, against gloo's own collectives.

argv: <result json>. Random fp32 buffers (with values of mixed magnitude, where the order of a sum
shows in its bits) are summed by `all_reduce` (sync and async, several in flight at once, one
of them 0-d) and by `dist.all_reduce`; bf16 and uint8 buffers are gathered by `PairAllGather` and by
`dist.all_gather_into_tensor`. Everything runs twice: through the shared-memory channel
(distributed/shared_pair.py; the larger buffers take several of its slots) and through gloo. Rank 0
writes whether each pair of results is bit-identical, and which transport served each round.
"""

import json
import sys

import torch
import torch.distributed as dist

from fsdp_qlora.distributed import pair
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.pair import PairAllGather, all_reduce, is_pair
from fsdp_qlora.distributed.shared_pair import SLOT_BYTES


def buffers(rank: int, seed: int, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    return torch.randn(numel, generator=generator) * torch.logspace(-8, 8, numel)[torch.randperm(numel, generator=generator)]


def main() -> None:
    env = init_distributed()
    seen = {"is_pair": is_pair(None)}
    for transport in ("shared memory", "gloo"):
        if transport == "gloo":
            pair._CHANNELS[dist.group.WORLD] = None  # what open_channel returns where shared memory can't serve
        seen[transport] = check(env)
        seen[transport]["shared memory channel"] = pair._CHANNELS[dist.group.WORLD] is not None
    if env.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(seen, f)
    shutdown()


def check(env) -> dict:
    seen = {}
    sums = {}
    for seed, numel in enumerate([1, 1000, 65536, 300001]):
        mine = buffers(env.rank, seed, numel)
        expected = mine.clone()
        dist.all_reduce(expected)
        ours = mine.clone()
        all_reduce(ours)
        sums[f"sync {numel}"] = torch.equal(ours, expected)
    in_flight = [buffers(env.rank, 10 + i, n) for i, n in enumerate([513, 7, 4096])]
    expected = [t.clone() for t in in_flight]
    for t in expected:
        dist.all_reduce(t)
    works = [all_reduce(t, async_op=True) for t in in_flight]
    for work in reversed(works):  # waited in any order
        work.wait()
    sums["async, three in flight"] = all(torch.equal(a, b) for a, b in zip(in_flight, expected))
    scalar = torch.tensor(float(env.rank + 1))
    all_reduce(scalar)
    sums["0-d"] = scalar.item() == 3.0
    seen["sums"] = sums
    gathers = {}
    gather = PairAllGather()
    for dtype, numel in [(torch.bfloat16, 1000), (torch.uint8, 4097), (torch.bfloat16, SLOT_BYTES + 3)]:
        mine = (buffers(env.rank, 20, numel) * 100).to(dtype)
        expected = torch.empty(2 * numel, dtype=dtype)
        dist.all_gather_into_tensor(expected, mine)
        ours = gather.allocate((2 * numel,), dtype=dtype, device=mine.device)
        assert gather(ours, mine, dist.group.WORLD) is None
        gathers[f"{dtype} {numel}"] = torch.equal(ours, expected)
    seen["gathers"] = gathers
    return seen


if __name__ == "__main__":
    main()
