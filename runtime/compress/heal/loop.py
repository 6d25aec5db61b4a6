"""One training unit (a decoder layer in stage (a), or stage (b)): Adam over the unit's fields until
its first limit (steps, tokens, time), with progress lines, and a clean stop between steps when
asked (the caller saves the state)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .state import Progress

__all__ = ["Limits", "lr_factor", "train_unit", "unit_fraction", "UnitResult"]

log = logging.getLogger("thawed.runtime.compress.heal")


@dataclass(frozen=True)
class Limits:
    steps: int | None  # optimiser steps in this unit
    tokens: int | None  # tokens in this unit
    until_seconds: float | None  # the run's training clock (Progress.seconds) at which the unit ends


@dataclass
class UnitResult:
    finished: bool  # False: stopped early by a signal (state must be saved)
    first_loss: float | None
    last_loss: float | None
    steps: int
    reason: str


def _reached(lim: Limits, step: int, tokens: int, seconds: float) -> str | None:
    if lim.steps is not None and step >= lim.steps:
        return "steps"
    if lim.tokens is not None and tokens >= lim.tokens:
        return "tokens"
    if lim.until_seconds is not None and seconds >= lim.until_seconds:
        return "time"
    return None


def unit_fraction(lim: Limits, progress: Progress, tokens_per_step: int) -> float:
    """How far the unit is through its budget, 0..1: the largest share used of any limit it has
    (steps, tokens, or its time from ``progress.unit_start`` to ``lim.until_seconds``); 0 without limits."""
    used = []
    if lim.steps:
        used.append(progress.step / lim.steps)
    if lim.tokens:
        used.append(progress.step * tokens_per_step / lim.tokens)
    if lim.until_seconds is not None:
        span = lim.until_seconds - progress.unit_start
        used.append((progress.seconds - progress.unit_start) / span if span > 0 else 1.0)
    return min(1.0, max(used)) if used else 0.0


def lr_factor(schedule: str, fraction: float) -> float:
    """The learning rate's multiplier at ``fraction`` of the unit: 1 (constant) or cosine decay to 0."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))
    return 1.0


def train_unit(label: str, params: list[tuple[str, nn.Parameter, float]], loss_at: Callable[[int], Tensor],
               tokens_per_step: int, lim: Limits, progress: Progress, clock: Callable[[], float],
               should_stop: Callable[[], bool], optim_state: dict[str, Tensor] | None,
               on_stop: Callable[[torch.optim.Adam, list[str]], None], log_every: float,
               on_step: Callable[[Progress], None] | None = None, schedule: str = "constant") -> UnitResult:
    """Steps from ``progress.step`` on; ``progress`` is updated after every step (step, seconds).
    ``params``: (name, parameter, learning rate); one Adam group per learning rate, scaled each step
    by ``lr_factor(schedule, unit_fraction(...))`` (a function of the progress, so a resumed unit
    continues the same schedule)."""
    from .state import restore_optimizer

    lrs = list(dict.fromkeys(r for _, _, r in params))
    groups = [[(n, p) for n, p, r in params if r == want] for want in lrs]
    names = [n for g in groups for n, _ in g]
    opt = torch.optim.Adam([{"params": [p for _, p in g], "lr": want} for g, want in zip(groups, lrs)],
                           foreach=False)
    if optim_state:
        restore_optimizer(opt, names, optim_state)
    first = last = None
    step0 = progress.step
    last_log = t_start = time.monotonic()
    reason = _reached(lim, progress.step, progress.step * tokens_per_step, progress.seconds)
    while reason is None:
        if should_stop():
            on_stop(opt, names)
            return UnitResult(False, first, last, progress.step - step0, "interrupted")
        f = lr_factor(schedule, unit_fraction(lim, progress, tokens_per_step))
        for group, want in zip(opt.param_groups, lrs):
            group["lr"] = want * f
        opt.zero_grad(set_to_none=True)
        loss = loss_at(progress.step)
        if not math.isfinite(float(loss.detach())):
            log.warning("heal %s: loss is %s at step %d; stopping this unit with the last finite fields", label,
                        float(loss.detach()), progress.step)
            reason = "nonfinite"
            break
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if first is None else first
        progress.step += 1
        progress.seconds = clock()
        if on_step is not None:
            on_step(progress)
        reason = _reached(lim, progress.step, progress.step * tokens_per_step, progress.seconds)
        now = time.monotonic()
        if now - last_log >= log_every or reason is not None:
            done = progress.step - step0
            rate = done * tokens_per_step / max(now - t_start, 1e-9)
            log.info("heal %s: step %d, loss %.4g (first %.4g), %.0f tokens/s, %s", label, progress.step, last,
                     first, rate, _eta(lim, progress, (now - t_start) / max(done, 1), tokens_per_step))
            last_log = now
    return UnitResult(True, first, last, progress.step - step0, reason or "steps")


def _eta(lim: Limits, progress: Progress, sec_per_step: float, tokens_per_step: int) -> str:
    left = []
    if lim.steps is not None:
        left.append((lim.steps - progress.step) * sec_per_step)
    if lim.tokens is not None:
        left.append(-(-(lim.tokens - progress.step * tokens_per_step) // tokens_per_step) * sec_per_step)
    if lim.until_seconds is not None:
        left.append(lim.until_seconds - progress.seconds)
    if not left:
        return "no limit"
    s = max(0.0, min(left))
    return f"ETA {int(s // 60)}:{int(s % 60):02d} for this unit"
