"""The two healing objectives: a decoder layer's output matched to the dense layer's (relative MSE),
and KL(dense || compressed) on next-token distributions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["relative_mse", "kl_dense_student"]


def relative_mse(out: Tensor, target: Tensor) -> Tensor:
    """``|out - target|^2 / |target|^2``: scale-free, so every layer's loss reads the same way."""
    return (out - target).square().sum() / target.square().sum().clamp_min(1e-30)


def kl_dense_student(dense_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of ``KL(p_dense || p_student)`` in nats."""
    lt = torch.log_softmax(dense_logits.float(), dim=-1)
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()
