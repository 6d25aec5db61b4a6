"""Healing settings and the budget that ends each stage.

Every limit given applies and the first one reached ends a stage:
- ``minutes``: wall-clock training time of the whole run (both stages; calibration and loading are
  not counted). Stage (a) gets ``block_share`` of it, split evenly over the decoder layers; stage (b)
  gets whatever is left.
- ``block_steps``: optimiser steps per decoder layer in stage (a).
- ``steps``: optimiser steps of stage (b); ``tokens``: tokens stage (b) trains on.

With only step limits (``minutes=None``) a run is deterministic: the same seed gives bit-equal
fields, interrupted and resumed or not.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from thawed.codecs.errors import ThawedError

from ..calib_data import DEFAULT_CALIB_TOKENS

__all__ = ["HealConfig", "SCHEDULES", "STAGES"]

STAGES = ("block", "e2e")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class HealConfig:
    minutes: float | None = 30.0
    block_steps: int | None = None
    steps: int | None = None
    tokens: int | None = None
    block_share: float = 0.5
    lr: float = 5e-4  # stage (a), Adam (SmolLM2 rtn b3, 4-min runs: 5e-4 beat 1e-4 and 2e-3 on PTB)
    lr_e2e: float = 1e-4  # stage (b), Adam
    # learning rate over each unit (a layer of stage (a), stage (b)): constant, or cosine decay to 0
    # over the unit's budget (its first limit to be reached: steps, tokens or its share of the time)
    schedule: str = "constant"
    ste: bool = False  # also train the codes a codec allows straight-through (SEE's per-token cores)
    lr_codes: float = 0.05  # Adam learning rate of straight-through code values (in code steps)
    # the stages that train straight-through codes: rtn's codes only block by block (EfficientQAT's
    # Block-AP; its end-to-end stage trains the step sizes only), SEE's per-token cores end to end
    ste_stages: tuple[str, ...] = STAGES
    # stage (b) only: the tensors whose codes it trains straight-through (a regular expression searched
    # in the tensor name; None = every tensor), and their learning rate (None = ``lr_codes``)
    ste_e2e_tensors: str | None = None
    lr_codes_e2e: float | None = None
    batch: int = 2  # sequences per step
    seq_len: int = 256
    calib_tokens: int = DEFAULT_CALIB_TOKENS  # compress's own: the same cached self-generated text
    seed: int = 0
    stages: tuple[str, ...] = STAGES
    log_every: float = 10.0  # seconds between progress lines

    def __post_init__(self) -> None:
        if self.minutes is not None and not self.minutes > 0:
            raise ThawedError(f"--minutes must be > 0, got {self.minutes}")
        for name in ("block_steps", "steps", "tokens"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ThawedError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.minutes is None and ("block" in self.stages and self.block_steps is None
                                     or "e2e" in self.stages and self.steps is None and self.tokens is None):
            raise ThawedError("healing needs a budget: give --minutes, or --block-steps and --steps/--tokens")
        if not 0 <= self.block_share <= 1:
            raise ThawedError(f"--block-share must be in [0, 1], got {self.block_share}")
        if not (self.lr > 0 and self.lr_e2e > 0 and self.lr_codes > 0):
            raise ThawedError(f"learning rates must be > 0, got --lr {self.lr} --lr-e2e {self.lr_e2e} "
                              f"--lr-codes {self.lr_codes}")
        if self.lr_codes_e2e is not None and not self.lr_codes_e2e > 0:
            raise ThawedError(f"--lr-codes-e2e must be > 0, got {self.lr_codes_e2e}")
        if self.ste_e2e_tensors is not None:
            try:
                re.compile(self.ste_e2e_tensors)
            except re.error as exc:
                raise ThawedError(f"--ste-e2e-tensors is not a regular expression ({exc}): "
                                  f"{self.ste_e2e_tensors!r}; give e.g. 'embed_tokens'") from None
        if self.batch < 1 or self.seq_len < 2:
            raise ThawedError(f"--batch must be >= 1 and --seq-len >= 2, got {self.batch} and {self.seq_len}")
        if self.calib_tokens < self.seq_len:
            raise ThawedError(f"--calib-tokens ({self.calib_tokens}) must cover one sequence of --seq-len "
                              f"({self.seq_len}) tokens")
        if self.schedule not in SCHEDULES:
            raise ThawedError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        bad_ste = [s for s in self.ste_stages if s not in STAGES]
        if bad_ste:
            raise ThawedError(f"--ste-stages takes a comma-separated subset of {', '.join(STAGES)}, got "
                              f"{','.join(self.ste_stages)}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ThawedError(f"--stages takes a comma-separated subset of {', '.join(STAGES)}, got "
                              f"{','.join(self.stages) or '(none)'}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        d["ste_stages"] = list(self.ste_stages)
        return d

    def same_run(self, other: dict) -> bool:
        """Whether a saved state's settings are this run's (what resume requires), ``log_every`` aside.
        A setting the saved state lacks (it predates the option) counts as its default, which is what
        that run did."""
        mine = self.as_dict()
        mine.pop("log_every")
        theirs = {k: other.get(k, v) for k, v in HealConfig().as_dict().items()} | dict(other)
        theirs.pop("log_every", None)
        return mine == theirs
