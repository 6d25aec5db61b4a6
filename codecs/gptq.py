"""GPTQ error feedback (Frantar et al. 2022, arXiv 2210.17323), shared by codecs whose quantiser
works one input column at a time (``rtn``, ``nwc``'s per-column path).

Encode side only: decoding is unchanged, so the stored format does not change. Given a weight
``W`` [m, n] (``nn.Linear`` layout: n = input features) and its layer's input second moment
``H = X^T X / T`` [n, n] from calibration, the columns are quantised one at a time and each
column's error is pushed onto the columns not yet quantised so that the layer's *output*
``X W^T`` changes as little as possible (the optimal update through the inverse Hessian):

- **dampening**: ``H += damp * mean(diag(H)) * I``; dead inputs (``H_jj == 0``) get ``H_jj = 1``
  and their weights are set to 0 before quantisation (they never see a non-zero input);
- **act-order**: columns are processed in decreasing ``H_jj`` (the most-used inputs first, while
  there is the most freedom left to compensate them);
- **lazy block updates**: errors are applied within a block of ``block`` columns as each column
  is quantised, and to the columns after the block in one matrix product per block;
- the inverse is taken once, as the upper Cholesky factor of ``H^-1`` (numerically stable).

The quantiser is a callback ``quantize(j, col) -> dequantised col``, ``j`` the column's index in
the original order: it may record codes as a side effect. Codecs that quantise in groups along a
row fix their group parameters from the original weights before GPTQ runs (GPTQ's
``static_groups``), which keeps act-order compatible with groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .errors import CodecError

__all__ = ["GptqConfig", "gptq", "gptq_options", "grid_codes", "layer_output_error"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01
    block: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.damp <= 10:
            raise CodecError(f"GPTQ option 'damp' must be in [0, 10], got {self.damp!r} (0.01 is usual)")
        if not 1 <= self.block <= 1 << 16:
            raise CodecError(f"GPTQ option 'block' must be in 1..65536, got {self.block!r} (128 is usual)")


def gptq_options(codec: str, gptq: object, damp: object, act_order: object) -> GptqConfig:
    """Check the options every codec with error feedback takes (``gptq``, ``damp``, ``act_order``)
    and return the configuration it runs GPTQ with."""
    if not isinstance(gptq, bool) or not isinstance(act_order, bool):
        raise CodecError(f"codec {codec!r} options 'gptq' and 'act_order' must be true or false, got {gptq!r}, "
                         f"{act_order!r}")
    return GptqConfig(damp=float(damp), act_order=act_order)  # checks damp


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` in float64, or None if singular."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype)
    lam = damp * float(torch.diagonal(H).mean())
    for extra in (0.0, 0.1, 1.0):  # a near-singular H gets more damping before giving up
        try:
            L = torch.linalg.cholesky(H + (lam + extra * float(torch.diagonal(H).mean())) * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    return None


def gptq(weight: Tensor, hessian: Tensor, quantize: Callable[[int, Tensor], Tensor],
         config: GptqConfig = GptqConfig(), *, name: str = "") -> Tensor:
    """Quantise ``weight`` [m, n] column by column with error feedback; returns the dequantised
    weight [m, n] float32 in the original column order (what ``quantize`` returned per column)."""
    if weight.dim() != 2:
        raise CodecError(f"tensor {name!r}: GPTQ needs a 2-D weight, got shape {list(weight.shape)}")
    m, n = weight.shape
    if tuple(hessian.shape) != (n, n):
        raise CodecError(f"tensor {name!r}: the input Hessian is {list(hessian.shape)}, expected [{n}, {n}] "
                         "(one row and column per input feature)")
    W = weight.detach().to("cpu", torch.float32).clone()
    H = hessian.detach().to("cpu", torch.float64).clone()
    if not torch.isfinite(H).all():
        raise CodecError(f"tensor {name!r}: the input Hessian has NaN/Inf values; recalibrate")
    dead = torch.diagonal(H) <= 0
    if bool(dead.all()):
        raise CodecError(f"tensor {name!r}: the input Hessian is all zero (the layer saw no input in calibration)")
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if config.act_order else torch.arange(n)
    W = W[:, perm]
    H = H[perm][:, perm]
    U = _inverse_cholesky(H, config.damp)
    Q = torch.empty_like(W)
    if U is None:
        log.warning("tensor %s: the input Hessian is not positive definite even damped; plain rounding", name)
        for i in range(n):
            Q[:, i] = quantize(int(perm[i]), W[:, i])
    else:
        U = U.to(torch.float32)
        for i1 in range(0, n, config.block):
            i2 = min(i1 + config.block, n)
            W1 = W[:, i1:i2].clone()
            E1 = torch.empty_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i]
                q = quantize(int(perm[i1 + i]), w.clone())
                Q[:, i1 + i] = q
                err = (w - q) / U1[i, i]
                W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :])
                E1[:, i] = err
            if i2 < n:
                W[:, i2:].sub_(E1 @ U[i1:i2, i2:])
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def grid_codes(weight: Tensor, hessian: Tensor, scale: Tensor, offset: Tensor, group_size: int, table: Tensor,
               config: GptqConfig = GptqConfig(), *, steps_per_unit: float = 1.0,
               name: str = "") -> tuple[Tensor, Tensor]:
    """GPTQ on a fixed affine grid per row group (rtn's integer grid, hyperc's 1-D codebook): the
    weight ``[m, n]``'s column ``j`` lies in group ``j // group_size``, whose ``scale`` and
    ``offset`` ``[m, G]`` were fitted on the original weights (static groups). Code ``k`` means
    ``offset + table[k] * scale``; ``table`` is the decoder's own (so encode and decode agree bit
    for bit), uniform with ``steps_per_unit`` points per unit starting at 0. Returns the codes
    int64 ``[m, n]`` and the weight they decode to (float32 ``[m, n]``)."""
    m, n = weight.shape
    sc, of = scale.float(), offset.float()
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    table = table.to(torch.float32).view(-1)
    top = table.numel() - 1
    group = torch.arange(n) // group_size
    codes = torch.empty((m, n), dtype=torch.int64)

    def column(j: int, col: Tensor) -> Tensor:
        s, o = sc[:, group[j]], of[:, group[j]]
        k = ((col - o) / safe[:, group[j]] * steps_per_unit).round_().clamp_(0, top).long()
        codes[:, j] = k
        return torch.addcmul(o, table[k], s)

    return codes, gptq(weight, hessian, column, config, name=name)


def layer_output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """``tr((W - W^) H (W - W^)^T)``: the mean squared output error of the layer on the inputs whose
    second moment is ``H`` (what GPTQ minimises)."""
    d = (weight.float() - approx.float()).double()
    return float(((d @ hessian.double()) * d).sum())
