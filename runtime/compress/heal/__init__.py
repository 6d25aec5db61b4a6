"""Healing (issue 17): fine-tune a compressed checkpoint's continuous fields (scales, offsets,
factors, norms) against its dense source -- block by block, then end to end on KL(dense || compressed)
-- with the discrete codes fixed, and write it back in the same format and size.

Offline only: the runtime never imports this package. ``thawed heal CKPT --out OUT``.
"""

from .config import HealConfig
from .run import HealInterrupted, HealResult, heal

__all__ = ["HealConfig", "HealInterrupted", "HealResult", "heal"]
