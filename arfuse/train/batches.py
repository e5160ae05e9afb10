"""Micro-batches of a training run as a pure function of (seed, index): resumable anywhere."""
from __future__ import annotations

import math

import numpy as np
import torch


class Batches:
    """Micro-batch ``i`` of the run as a pure function of (seed, i): resumable anywhere.

    random: each epoch cuts the stream into blocks of ``T`` tokens at a random offset and
    visits them in a random order. sequential: the stream is cut into ``B`` columns read
    ``T`` tokens at a time (word_language_model's batchify), the RNN state carried along.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, block: int, sampling: str, seed: int):
        self.ids, self.B, self.T, self.sampling, self.seed = ids, batch_size, block, sampling, seed
        n = len(ids)
        if sampling == "random":
            self.n_blocks = (n - 1) // block
            self.per_epoch = self.n_blocks // batch_size
            self._epoch, self._perm, self._offset = -1, None, 0
        else:
            self.col_len = n // batch_size
            self.cols = ids[: batch_size * self.col_len].view(batch_size, self.col_len)  # (B, n/B)
            self.per_epoch = math.ceil((self.col_len - 1) / block) if self.col_len > 1 else 0

    def get_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y, starts_epoch) of micro-batch ``i``: (B, T) inputs and next-token targets."""
        epoch, j = divmod(i, self.per_epoch)
        if self.sampling == "sequential":
            a = j * self.T
            t = min(self.T, self.col_len - 1 - a)
            return self.cols[:, a:a + t], self.cols[:, a + 1:a + 1 + t], j == 0
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            slack = (len(self.ids) - 1) - self.n_blocks * self.T
            self._offset = int(rng.integers(0, slack + 1))
            self._perm = rng.permutation(self.n_blocks)
            self._epoch = epoch
        starts = self._offset + self._perm[j * self.B:(j + 1) * self.B] * self.T
        idx = torch.as_tensor(starts)[:, None] + torch.arange(self.T + 1)  # (B, T+1)
        chunk = self.ids[idx]
        return chunk[:, :-1], chunk[:, 1:], j == 0
