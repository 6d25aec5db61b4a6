"""Calibration batches for healing: the self-generated text of ``runtime/calib_data.py`` (or the
user's file, or PTB train), never an evaluation corpus, cut into ``[batch, seq_len]`` id tensors.
The order of batches is a function of the seed and the step alone, so a resumed run sees the same
batches as an uninterrupted one."""

from __future__ import annotations

import torch
from torch import Tensor

from thawed.codecs.errors import ThawedError

__all__ = ["Batches"]


class Batches:
    def __init__(self, ids: list[int], batch: int, seq_len: int, seed: int) -> None:
        n_seq = len(ids) // seq_len
        if n_seq < 1:
            raise ThawedError(f"calibration gave {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}; "
                              "raise --calib-tokens or give a longer --calib-text")
        seqs = torch.tensor(ids[: n_seq * seq_len], dtype=torch.int64).view(n_seq, seq_len)
        batch = min(batch, n_seq)
        n_batches = n_seq // batch
        self.data = seqs[: n_batches * batch].view(n_batches, batch, seq_len)
        self.seed = seed

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def tokens_per_batch(self) -> int:
        return self.data.shape[1] * self.data.shape[2]

    def index(self, step: int, salt: int = 0) -> int:
        """The batch of optimiser step ``step`` (a fresh seeded permutation every pass over the data;
        ``salt`` gives each layer its own order)."""
        n = len(self)
        epoch, i = divmod(step, n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt * 7_919 + epoch)
        return int(torch.randperm(n, generator=g)[i])

    def at(self, step: int, salt: int = 0) -> Tensor:
        return self.data[self.index(step, salt)]
