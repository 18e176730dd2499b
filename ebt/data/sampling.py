"""The batching rule every loader shares (tokens, video clips, images).

Which items form the batch at a step is a pure function of (seed, step): item order in epoch e is
np.random.default_rng([seed, e]).permutation(n), each epoch is cut into n // global_batch batches (the
remainder is dropped), and rank r of W takes rows r*B/W .. (r+1)*B/W of the global batch, so the union
over ranks is exactly the single-process batch. A run resumed at any step sees the batches it would
have seen, with no loader state to save. Evaluation takes every item once in order or, with a limit,
that many items evenly spread (a prefix would score only the first documents, clips or classes).
"""

from __future__ import annotations

import numpy as np

from ebt.errors import ConfigError, DataError


class EpochSampler:
    def __init__(self, n: int, too_few: str):
        """n items; too_few: the start of the message when a batch is larger than the split (the batch
        size and a fix are appended by the caller's wording)."""
        self.n, self.too_few = int(n), too_few
        self._key, self._perm = None, None

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        if self._key != (seed, epoch):  # one epoch's order, cached: consecutive steps reuse it
            self._perm = np.random.default_rng([seed, epoch]).permutation(self.n)
            self._key = (seed, epoch)
        return self._perm

    def batch_ids(self, step: int, global_batch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> np.ndarray:
        """Indices of this rank's rows of the global batch for `step`."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..world_size-1 (got rank={rank}, world_size={world_size})")
        if global_batch < 1 or global_batch % world_size:
            raise ConfigError(f"global batch {global_batch} is not divisible by world size {world_size}; "
                              f"pick a batch size that is a multiple of the number of processes")
        if global_batch > self.n:
            raise DataError(f"{self.too_few}, fewer than the batch size {global_batch}; use a smaller batch")
        epoch, j = divmod(int(step), self.n // global_batch)
        per_rank = global_batch // world_size
        start = j * global_batch + rank * per_rank
        return self.permutation(seed, epoch)[start: start + per_rank]

    def eval_ids(self, batch_size: int, rank: int = 0, world_size: int = 1, limit: int | None = None):
        """Batches of indices covering every item once (or `limit` evenly spread); rank r takes r, r+W, ..."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
        if limit is None or limit >= self.n:
            chosen = np.arange(self.n)
        else:
            chosen = (np.arange(int(limit)) * self.n) // int(limit)
        ids = chosen[rank::world_size]
        for b in range(0, len(ids), batch_size):
            yield ids[b: b + batch_size]
