"""Token frequencies on calibration text, for codecs that weight embedding rows by use (``see``).

Imported only by the compression pipeline (lazily); the runtime never needs it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["token_frequencies", "FREQ_TOKENS"]

log = logging.getLogger(__name__)

FREQ_TOKENS = 250_000  # the first 250k tokens of Penn Treebank train (about a quarter of it)


def token_frequencies(src: str | Path, vocab: int, tokens: int = FREQ_TOKENS, text: str | None = None) -> Tensor:
    """Counts ``[vocab]`` (float32) of each token id in the first ``tokens`` tokens of the
    calibration text (default PTB train, tokenised with the model's own tokenizer, no BOS)."""
    from ..loading import load_tokenizer
    from .calibrate import calibration_ids

    t0 = time.perf_counter()
    ids = torch.tensor(calibration_ids(load_tokenizer(src), tokens, text), dtype=torch.int64)
    ids = ids[(ids >= 0) & (ids < vocab)]
    counts = torch.bincount(ids, minlength=vocab)[:vocab].to(torch.float32)
    log.info("token frequencies: %d tokens, %d distinct ids of %d, %.1fs", int(ids.numel()),
             int((counts > 0).sum()), vocab, time.perf_counter() - t0)
    return counts
