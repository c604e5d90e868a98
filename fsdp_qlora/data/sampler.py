"""A deterministic, resumable, rank-sharded batch order.

Epoch e's order is a permutation seeded with ``seed + e`` (torch.randperm), exactly the one
torch's DistributedSampler(shuffle=True, drop_last=True) draws: the tail that does not divide
by the world size is dropped, so every rank gets the same number of examples and batches
(a rank with an extra batch would hang the others' collectives), and rank r takes every
world_size-th index from r. Batches are consecutive runs of batch_size (the last may be short).

With ``group_by_length`` the rank's indices are cut into mega-batches of 50 batches, each sorted
by length and split into batches (little padding), and the batch order is shuffled with the
same seeded generator.

The position in the stream is (epoch, examples of that epoch's global order consumed):
`TrainData` keeps it and saves it with the checkpoint; any epoch's batches from any position are
recomputed from the seed alone, for any world size and batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MEGA_BATCHES = 50


class ShardedBatchSampler:
    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, lengths: Sequence[int] | None = None, group_by_length: bool = False):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.lengths, self.group_by_length = lengths, group_by_length
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the example lengths")
        if num_examples % world_size:
            self.per_rank = math.ceil((num_examples - world_size) / world_size)
        else:
            self.per_rank = num_examples // world_size

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        return math.ceil(self.per_rank / self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's global order of examples (all ranks), its tail that the world size does not
        divide dropped."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        return order[:self.per_rank * self.world_size]

    def rank_indices(self, epoch: int, start: int = 0) -> list[int]:
        """This rank's share of the epoch's order from global position `start` on: every world-th
        example, the remainder trimmed to a multiple of the world size (equal counts per rank)."""
        remaining = self.epoch_order(epoch)[start:]
        remaining = remaining[:len(remaining) - len(remaining) % self.world_size]
        return remaining[self.rank::self.world_size]

    def epoch_batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches (lists of dataset indices) for one epoch, from global position `start`
        (a resumed run's examples consumed; 0 = the whole epoch). Each micro-step of all ranks takes
        the next world x batch examples of the order, so positions carry over between layouts."""
        if start and self.group_by_length:
            raise ValueError("length-grouped batches cannot start mid-epoch at an example position")
        indices = self.rank_indices(epoch, start)
        size = self.batch_size
        if not self.group_by_length:
            return [indices[i:i + size] for i in range(0, len(indices), size)]
        batches = []
        mega = size * MEGA_BATCHES
        for start in range(0, len(indices), mega):
            chunk = sorted(indices[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch + 1_000_003)  # another stream than the example order
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
