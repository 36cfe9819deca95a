"""Deterministic, resumable batch sampling for iteration-based training.

Iteration t uses positions t*B .. t*B+B-1 of an endless sequence of epochs, each epoch a permutation
drawn from ``default_rng([seed, epoch])``. Every sample also gets its own augmentation seed derived from
(seed, t, position). The batches of iteration t therefore do not depend on where a run started, on the
number of DataLoader workers, or on the number of processes: a resumed run sees exactly the data of an
uninterrupted one, and a DDP run splits each global batch into equal contiguous parts, one per rank.
"""
from __future__ import annotations

import numpy as np


class IterationBatchSampler:
    """Yields, for t in [start_iter, total_iters), this rank's part of global batch t as (index, seed) pairs.

    Args:
        num_items: dataset size N.
        batch_size: GLOBAL batch size B (divisible by ``world``).
        seed: run seed.
        start_iter, total_iters: the iteration range to yield.
        rank, world: this process's part of each global batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_iter: int, total_iters: int,
                 rank: int = 0, world: int = 1):
        if num_items <= 0:
            raise ValueError("cannot sample batches from an empty training list")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the number of processes {world}")
        self.n, self.batch, self.seed = num_items, batch_size, seed
        self.start, self.total, self.rank, self.world = start_iter, total_iters, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def global_batch(self, t: int) -> list[tuple[int, int]]:
        """All (index, augmentation seed) pairs of iteration t."""
        out = []
        for j in range(self.batch):
            pos = t * self.batch + j
            epoch, within = divmod(pos, self.n)
            sample_seed = int(np.random.default_rng([self.seed, t, j, 7]).integers(2 ** 62))
            out.append((int(self._perm(epoch)[within]), sample_seed))
        return out

    def __iter__(self):
        part = self.batch // self.world
        for t in range(self.start, self.total):
            yield self.global_batch(t)[self.rank * part:(self.rank + 1) * part]

    def __len__(self) -> int:
        return max(0, self.total - self.start)
