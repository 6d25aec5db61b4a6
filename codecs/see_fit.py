"""Encode-side fitting for the ``see`` codec: unit clustering, Kronecker factors, closed-form fits.

Nothing here is needed to decode. Two fits:

* ``fit_units`` (embedding tables): every row ``x_i`` (length ``d``, zero-padded to ``p*q``) is
  read as a ``p x q`` matrix ``X_i``. Token ``i`` belongs to a row-unit ``a_i`` and a column-unit
  ``b_i``; unit ``a`` owns ``R`` orthonormal factor vectors ``A_a`` (``p x R``), unit ``b`` owns
  ``B_b`` (``q x R``); the row is ``A_a G_i B_b^T = sum_{r,s} G_i[r,s] kron(A_a[:,r], B_b[:,s])``
  with a per-token ``R x R`` core ``G_i``. The fit minimises ``sum_i w_i |X_i - A G_i B^T|^2`` (``w``
  = token frequency mixed with a uniform share) by alternation, every step closed form and
  non-increasing: the core is the projection ``A^T X B``; a unit's factors are the top-``R``
  eigenvectors of its members' weighted ``(X B)(X B)^T``; a token moves to the unit whose factor
  space keeps most of its energy (k-subspaces clustering). Units start from a weighted k-means of
  the normalised rows (tokens with similar embeddings share units). Entries past ``d`` (when
  ``p*q > d``: the truncated tail) are re-imputed from the current fit each round, so they are
  free, not forced to zero.
* ``kron_fit`` (linear weights): ``W ~= sum_r A_r (x) B_r`` in closed form -- Van Loan and
  Pitsianis' rearrangement of ``W`` to ``[m1*n1, m2*n2]`` and a rank-``R`` SVD.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

__all__ = ["fit_units", "kron_fit", "rearrange", "kmeans", "factor_pair"]

log = logging.getLogger(__name__)

_CHUNK = 8192  # tokens per batch in the [n, p, p] / [n, K] temporaries


def factor_pair(d: int) -> tuple[int, int]:
    """``(p, q)`` with ``p <= q``, ``p*q >= d`` and ``p*q`` as small as possible near ``sqrt(d)``.

    An exact divisor pair is used when one exists with ``p >= sqrt(d)/2`` (576 -> 24 x 24,
    1536 -> 32 x 48); otherwise ``p = ceil(sqrt(d))`` and ``q = ceil(d / p)`` (the tail is truncated).
    """
    if d <= 0:
        return 1, max(d, 0)
    r = math.isqrt(d)
    for p in range(r, 0, -1):
        if d % p == 0:
            if p * 2 >= r:
                return p, d // p
            break
    p = math.ceil(math.sqrt(d))
    q = math.ceil(d / p)
    return min(p, q), max(p, q)


def kmeans(x: Tensor, w: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Weighted k-means (squared Euclidean) of rows ``x [n, d]``; returns assignments ``[n]`` int64."""
    n = x.shape[0]
    k = min(k, n)
    init = torch.multinomial(w / w.sum(), k, replacement=False, generator=gen)
    cent = x[init].clone()
    assign = torch.zeros(n, dtype=torch.int64)
    for _ in range(max(1, iters)):
        cn = cent.square().sum(1)
        for s in range(0, n, _CHUNK):
            xs = x[s:s + _CHUNK]
            assign[s:s + _CHUNK] = (cn - 2 * xs @ cent.T).argmin(1)
        mass = torch.zeros(k).index_add_(0, assign, w)
        tot = torch.zeros_like(cent).index_add_(0, assign, x * w[:, None])
        keep = mass > 0
        cent[keep] = tot[keep] / mass[keep, None]
    return assign


def _top_eig(s: Tensor, r: int) -> Tensor:
    """Top-``r`` eigenvectors (columns, descending) of a batch of symmetric PSD matrices ``[K, p, p]``."""
    _, vec = torch.linalg.eigh(s.double())
    return vec[..., -r:].flip(-1).float()


def _unit_update(xs: Tensor, other: Tensor, w: Tensor, assign: Tensor, basis: Tensor,
                 r: int) -> tuple[Tensor, Tensor]:
    """One half-step of the alternation for the units on one side.

    ``xs [n, p, q]``, ``other [n, q, R]`` the other side's factors of each token. Returns the new
    factors ``[K, p, R]`` and the new assignment ``[n]`` (reassigned against the new factors).
    """
    n, p, _ = xs.shape
    k = basis.shape[0]
    s = torch.zeros(k, p, p)
    for c in range(0, n, _CHUNK):
        y = torch.bmm(xs[c:c + _CHUNK], other[c:c + _CHUNK])  # [c, p, R]
        yy = torch.bmm(y, y.transpose(1, 2))  # [c, p, p]
        s.index_add_(0, assign[c:c + _CHUNK], yy * w[c:c + _CHUNK, None, None])
    used = s.flatten(1).abs().sum(1) > 0
    new = basis.clone()
    if bool(used.any()):
        new[used] = _top_eig(s[used], r)
    proj = torch.bmm(new, new.transpose(1, 2)).reshape(k, p * p)  # [K, p*p] projectors
    out = torch.empty_like(assign)
    for c in range(0, n, _CHUNK):
        y = torch.bmm(xs[c:c + _CHUNK], other[c:c + _CHUNK])
        feat = torch.bmm(y, y.transpose(1, 2)).reshape(-1, p * p)
        out[c:c + _CHUNK] = (feat @ proj.T).argmax(1)  # the unit keeping most of the token's energy
    return new, out


def fit_units(x: Tensor, w: Tensor, p: int, q: int, rank: int, units: int, iters: int,
              seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit the unit model to rows ``x [V, d]`` with weights ``w [V]``.

    Returns ``(A [K, p, R], B [K, q, R], a [V], b [V])``: orthonormal unit factors and each
    token's row-unit and column-unit (int64). ``K = min(units, V)``.
    """
    v, d = x.shape
    k = min(units, v)
    gen = torch.Generator().manual_seed(seed)
    xs = torch.zeros(v, p * q)
    xs[:, :d] = x
    xs = xs.view(v, p, q)
    norm = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    a = kmeans(norm, w, k, 6, gen)
    b = a.clone()
    # Start every unit from the global 2-D PCA bases.
    gb = _top_eig((xs.transpose(1, 2) @ xs * w[:, None, None]).sum(0)[None], rank)[0]  # [q, R]
    ga = _top_eig((xs @ xs.transpose(1, 2) * w[:, None, None]).sum(0)[None], rank)[0]  # [p, R]
    A = ga.expand(k, p, rank).clone()
    B = gb.expand(k, q, rank).clone()
    total = float((x.square().sum(1) * w).sum())
    for it in range(max(1, iters)):
        A, a = _unit_update(xs, B[b], w, a, A, rank)
        B, b = _unit_update(xs.transpose(1, 2), A[a], w, b, B, rank)
        if p * q > d or log.isEnabledFor(logging.DEBUG):
            rec = torch.empty(v, p, q)
            for c in range(0, v, _CHUNK):
                Aa, Bb, xc = A[a[c:c + _CHUNK]], B[b[c:c + _CHUNK]], xs[c:c + _CHUNK]
                g = Aa.transpose(1, 2) @ xc @ Bb
                rec[c:c + _CHUNK] = Aa @ g @ Bb.transpose(1, 2)
            err = float(((rec.reshape(v, -1)[:, :d] - x).square().sum(1) * w).sum())
            log.debug("see unit fit round %d: weighted relative error %.4f", it, err / max(total, 1e-30))
            if p * q > d:  # the truncated tail is free: impute it from the current fit
                xs.view(v, -1)[:, d:] = rec.view(v, -1)[:, d:]
    return A, B, a, b


def rearrange(w: Tensor, m1: int, n1: int, m2: int, n2: int) -> Tensor:
    """Van Loan's rearrangement: ``[m1*m2, n1*n2] -> [m1*n1, m2*n2]`` so that ``kron(A, B)``
    becomes the rank-1 matrix ``vec(A) vec(B)^T`` (row-major vecs)."""
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def _top_svd(x: Tensor, rank: int, power_iters: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets of ``x``: the full SVD when ``rank`` is a large share of
    the matrix, otherwise a seeded randomized range finder with power iterations (Halko et al.)
    -- exact for a matrix of rank <= ``rank`` + 16, and ~15x faster than the full SVD of SmolLM2's
    768 x 1152 rearranged MLP weights."""
    small = min(x.shape)
    k = min(small, rank + 16)
    if k * 3 >= small:
        return torch.linalg.svd(x, full_matrices=False)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(x @ torch.randn(x.shape[1], k, generator=gen, dtype=x.dtype))
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(x.T @ q)
        q, _ = torch.linalg.qr(x @ q)
    u, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return q @ u, s, vh


def kron_fit(w: Tensor, m1: int, n1: int, m2: int, n2: int, rank: int) -> tuple[Tensor, Tensor]:
    """Closed-form best ``sum_{r<rank} A_r (x) B_r`` in Frobenius norm: ``A [R, m1, n1]``, ``B [R, m2, n2]``.

    The singular value is split evenly (``sqrt(s)`` on each side) so both factors have similar
    ranges, which suits quantising them.
    """
    rw = rearrange(w.double(), m1, n1, m2, n2)
    u, s, vh = _top_svd(rw, rank)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    A = (u[:, :r] * root).T.reshape(r, m1, n1)
    B = (vh[:r] * root[:, None]).reshape(r, m2, n2)
    return A.float(), B.float()
