"""``hyperc``: Hyper-Compression -- each short vector of weights is the integer "time" at which a
wound trajectory on the unit torus passes closest to it (arXiv 2409.00592), per group.

The trajectory is the line ``t -> frac(t * z / K)`` with a Korobov direction ``z = (1, a, a^2, ...)
mod K`` sampled at the integer times ``k = 0 .. K-1``; those ``K`` points are a rank-1 lattice in
``[0, 1)^dim`` (the reference scheme's "slope 1/40, K=1600" line is ``dim=2, points=1600,
generator=40``). ``a`` is chosen at encode time to maximise the codebook's minimum distance and
stored in the params, so decoding needs no search.

A weight is viewed as ``[m, n]`` over its last dimension (like ``rtn``); each row is cut into
groups of ``group_size`` weights (a multiple of ``dim``; 0 = the whole row) and each group into
vectors of ``dim`` consecutive weights (the row is edge-padded to a multiple of ``dim`` inside
encode/decode only). Per group an F16 ``offset`` and ``scale`` place the codebook box; per vector
one index ``k`` of ``index_bits`` bits::

    w[j] ~= offset + scale * ((k * z[j]) mod K) / K,   j = 0 .. dim-1

Fields (``V = ceil(n / dim)`` vectors per row, ``G`` groups per row, ``B = index_bits``)::

    codes_lo: [packed_nbytes(m*V, min(B, 8))] uint8   # the low min(B, 8) bits of every index
    codes_hi: [packed_nbytes(m*V, B - 8)] uint8       # the high bits, only when B > 8
    scale:    [m, G] float16
    offset:   [m, G] float16

Params: ``{"dim", "index_bits", "points", "generator": [z0..z_{dim-1}], "group_size"}``.
bpw = index_bits / dim + 32 / group_size (aligned shapes), every byte counted.

Encoding: the group's box is ``[min, max]`` widened by a margin of half a codebook spacing so the
lattice's missing torus neighbours at the box edge cost little; with ``clip_search`` a few narrower
boxes are tried too and each group keeps its lowest squared error (clipping is the outlier
handling: a point outside the box is clamped onto it, never wrapped). The nearest codebook point
is found for all vectors at once in torch: Babai rounding in an LLL-reduced basis of the lattice,
then the ``3**dim`` neighbouring lattice points, keeping the nearest one inside the box (the index
of a lattice point in the box is its first coordinate). No KD-tree, no loop over weights.

``target_bpw``: per tensor, for each dim 1..4 the (index_bits, group_size) whose exact bpw for
this row length is <= target_bpw and that maximises a Gaussian model of SQNR (6.02 dB per index
bit per weight, minus the expected group range, plus the lattice gain); the tensor is encoded with
each and keeps the one with the lowest squared error (so compression costs ~4 encodes). The index
rate is fractional (13 bits per 3 weights), which plain ``rtn`` cannot do -- on genuine fp32
weights that, more than the lattice shape, is where the gain comes from; on SmolLM2's
Q4_1-derived weights the scalar (dim 1) candidate often wins (docs/HYPERC.md).

Quality floor (MiniLM-L6's 36 genuine fp32 encoder linear weights, SQNR all together / worst
tensor; ``rtn`` g64 at the same bpw in brackets): target_bpw=3.5: 15.97 / 14.99 dB (13.94 / 13.31);
4.5: 21.69 / 20.43 dB (20.55 / 19.79); 5.5: 27.63 / 26.43 dB (26.84 / 26.06).
tests/test_codec_hyperc.py holds floors a little below these on a subset (FLOORS).

Decode cost per weight: unpack 1-2 bit planes (uint8 shifts / one int16 read), one gather from a
``[K, dim]`` float32 table (``closed_form=True`` computes ``(k*z) mod K / K`` instead, bit-identical)
and one fused ``x * scale + offset``. Measured on 2 CPU cores over SmolLM2-135M (134.5 M weights,
to float32): 3.1 ns/weight for the 4.5 bpw checkpoint, 5.7 ns/weight with 11-bit 2-D indices
(``rtn`` b4: 1.4 ns/weight). On CUDA ``decode`` runs one Triton kernel (``kernels/hyperc.py``, the
closed form; ``fast=False`` keeps this reference), and 1-D payloads have a fused small-batch
decode-matmul there. Details and the rate-distortion results: docs/HYPERC.md.
"""

from __future__ import annotations

import itertools
import logging
import math
from functools import lru_cache
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params, check_param)
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .errors import CodecError, CorruptPayloadError
from .rtn import F16_MAX, GroupedAffineHealing, _f16_down, _f16_up, _matrix_shape, unpack_codes

__all__ = ["HyperC", "hyperc_decode_reference", "choose_rate", "rate_candidates", "codebook", "good_generator",
           "nearest_index"]

log = logging.getLogger(__name__)

MAX_DIM = 4
MAX_INDEX_BITS = 16
MAX_GROUP = 1 << 20
# Boxes tried per group by ``clip_search``: (shrink factor, margin?) -- 1.0 = the group's full
# range; margin = half a codebook spacing inside the box (the first entry is the only one without
# ``clip_search``; the second puts the extremes on the box faces, as ``rtn`` does).
CLIP_FACTORS = ((1.0, True), (1.0, False), (0.93, True), (0.86, True), (0.78, True))
HQQ_ITERS = 20  # offset refinement iterations for 1-D codebooks (``refine``)
_CHUNK = 1 << 17  # vectors per nearest-point batch (bounds memory at 3**dim candidates each)


# ---- the codebook ------------------------------------------------------------------------------
# good_generator(dim, 2**bits), precomputed by its own search (deterministic): dim -> {bits: a}.
_GENERATORS: dict[int, dict[int, int]] = {
    2: {3: 3, 4: 3, 5: 7, 6: 19, 7: 23, 8: 71, 9: 67, 10: 271, 11: 305, 12: 1697, 13: 5373, 14: 6581, 15: 24017, 16: 8105},
    3: {4: 3, 5: 3, 6: 5, 7: 5, 8: 13, 9: 101, 10: 35, 11: 1575, 12: 2895, 13: 3133, 14: 14413, 15: 21897, 16: 369},
    4: {5: 3, 6: 3, 7: 11, 8: 9, 9: 99, 10: 405, 11: 1013, 12: 329, 13: 5899, 14: 2087, 15: 1739, 16: 10641},
}


def _korobov(a: int, dim: int, points: int) -> list[int]:
    return [pow(a, j, points) for j in range(dim)]


def _lll(basis: list[list[float]], delta: float = 0.99) -> list[list[float]]:
    """LLL reduction of a small integer basis (rows), exact enough in float64 for K <= 2**16."""
    b = [list(map(float, r)) for r in basis]
    n = len(b)

    def dot(u: list[float], v: list[float]) -> float:
        return sum(x * y for x, y in zip(u, v))

    def gso() -> tuple[list[list[float]], list[list[float]], list[float]]:
        bs: list[list[float]] = []
        mu = [[0.0] * n for _ in range(n)]
        nrm = []
        for i in range(n):
            v = b[i][:]
            for j in range(i):
                mu[i][j] = dot(b[i], bs[j]) / nrm[j]
                v = [x - mu[i][j] * y for x, y in zip(v, bs[j])]
            bs.append(v)
            nrm.append(dot(v, v))
        return bs, mu, nrm

    k = 1
    bs, mu, nrm = gso()
    guard = 0
    while k < n and guard < 10000:
        guard += 1
        for j in range(k - 1, -1, -1):
            q = round(mu[k][j])
            if q:
                b[k] = [x - q * y for x, y in zip(b[k], b[j])]
                bs, mu, nrm = gso()
        if nrm[k] >= (delta - mu[k][k - 1] ** 2) * nrm[k - 1]:
            k += 1
        else:
            b[k], b[k - 1] = b[k - 1], b[k]
            bs, mu, nrm = gso()
            k = max(k - 1, 1)
    return b


def _lattice_basis(z: list[int], points: int) -> list[list[float]]:
    """LLL-reduced basis (rows, integer units) of {k*z + points*m}: the codebook's lattice."""
    dim = len(z)
    rows = [list(map(float, z))] + [[float(points) if i == j else 0.0 for i in range(dim)] for j in range(1, dim)]
    return _lll(rows)


def _min_distance(basis: list[list[float]]) -> float:
    """Shortest nonzero lattice vector among small combinations of a reduced basis."""
    dim = len(basis)
    best = math.inf
    for c in itertools.product((-1, 0, 1), repeat=dim):
        if any(c):
            v = [sum(ci * basis[i][j] for i, ci in enumerate(c)) for j in range(dim)]
            best = min(best, math.sqrt(sum(x * x for x in v)))
    return best


@lru_cache(maxsize=64)
def good_generator(dim: int, points: int) -> int:
    """The Korobov ``a`` (deterministic) whose lattice has the largest minimum distance."""
    if dim == 1:
        return 1
    bits = points.bit_length() - 1
    if points == 1 << bits and bits in _GENERATORS.get(dim, {}):
        return _GENERATORS[dim][bits]
    cands = range(1, points)
    if points > 1500:  # a fixed, spread-out subset: deterministic and a second or so
        g = torch.Generator().manual_seed(dim * 1_000_003 + points)
        cands = sorted(set(int(x) for x in torch.randint(1, points, (1500,), generator=g)))
    best_a, best_d = 1, -1.0
    for a in cands:
        z = _korobov(a, dim, points)
        if math.gcd(a, points) != 1:
            continue
        d = _min_distance(_lattice_basis(z, points))
        if d > best_d + 1e-9:
            best_a, best_d = a, d
    return best_a


@lru_cache(maxsize=64)
def _search_tables(z: tuple[int, ...], points: int) -> tuple[Tensor, Tensor, Tensor]:
    """(basis [d, d], inverse [d, d], neighbour offsets [3**d, d]) for the nearest-point search."""
    basis = torch.tensor(_lattice_basis(list(z), points), dtype=torch.float64)
    inv = torch.linalg.inv(basis)
    offs = torch.tensor(list(itertools.product((-1, 0, 1), repeat=len(z))), dtype=torch.float64)
    return basis, inv, offs


_TABLE_CACHE: dict[tuple[tuple[int, ...], int, str], Tensor] = {}


def codebook(z: tuple[int, ...] | list[int], points: int, device: torch.device | str = "cpu") -> Tensor:
    """The ``[points, dim]`` float32 table of codebook coordinates in [0, 1): the decode fast path."""
    key = (tuple(int(v) for v in z), int(points), str(device))
    t = _TABLE_CACHE.get(key)
    if t is None:
        zt = torch.tensor(key[0], dtype=torch.int64, device=device)
        k = torch.arange(points, dtype=torch.int64, device=device)
        t = ((k[:, None] * zt) % points).to(torch.float32) / points
        if len(_TABLE_CACHE) > 64:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = t
    return t


def _coords_closed_form(k: Tensor, z: list[int], points: int) -> Tensor:
    """Closed form of ``codebook(z, points)[k]``: ``((k * z_j) mod K) / K`` (int64, then float32)."""
    zt = torch.tensor(z, dtype=torch.int64, device=k.device)
    return ((k.to(torch.int64).unsqueeze(-1) * zt) % points).to(torch.float32) / points


def nearest_index(t: Tensor, z: list[int], points: int) -> Tensor:
    """Index of the nearest codebook point for every row of ``t`` [N, d] (integer lattice units,
    already clamped to [0, K-1]); int64 [N].

    Babai rounding in the reduced basis, then the nearest of the ``3**d`` neighbouring lattice
    points by one matmul (``|r + D|^2 = 2 r.D + |D|^2 + const``); the few rows whose choice falls
    outside the box (near its edge) are redone keeping only neighbours inside it.
    """
    basis, inv, offs = _search_tables(tuple(z), points)
    b32, inv32 = basis.to(torch.float32), inv.to(torch.float32)
    D = (offs @ basis).to(torch.float32)  # [M, d] neighbour displacements
    Dt2 = (2 * D).T.contiguous()
    cst = D.square().sum(1)
    out = torch.empty(t.shape[0], dtype=torch.int64)
    lim = float(points - 1)
    for s in range(0, t.shape[0], _CHUNK):
        tc = t[s:s + _CHUNK]
        c = (tc @ inv32).round_()  # [N, d] Babai coefficients
        r = torch.addmm(tc, c, b32, alpha=1, beta=-1)  # c.B - t: [N, d]
        best = torch.addmm(cst, r, Dt2).argmin(1)  # [N]
        p = (r + D[best]).add_(tc)  # chosen lattice point, integer units
        outside = ((p < -0.5) | (p > lim + 0.5)).any(1)
        if bool(outside.any()):
            rows = outside.nonzero().squeeze(1)
            cand = r[rows].unsqueeze(1) + D + tc[rows].unsqueeze(1)  # [R, M, d]
            d2 = (cand - tc[rows].unsqueeze(1)).square_().sum(-1)
            inside = ((cand >= -0.5) & (cand <= lim + 0.5)).all(-1)
            d2.masked_fill_(~inside, math.inf)
            p[rows] = cand[torch.arange(rows.numel()), d2.argmin(1)]
        out[s:s + _CHUNK] = p[:, 0].round_().to(torch.int64).remainder_(points)  # wraps only if no
        # neighbour was inside the box (rare; the index is still valid)
    return out


# ---- rate choice -------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _expected_range(g: int) -> float:
    """Expected range of ``g`` iid standard normals / 2 (Blom-style approximation)."""
    if g < 2:
        return 0.5
    from statistics import NormalDist

    return NormalDist().inv_cdf((g - 0.375) / (g + 0.25))


def _bpw(dim: int, bits: int, g: int, n: int | None) -> float:
    """Stored bits per weight; exact for rows of ``n`` weights (partial groups/vectors counted)."""
    if n is None:
        return bits / dim + 32 / g
    return (-(-n // dim) * bits + -(-n // g) * 32) / n


@lru_cache(maxsize=256)
def rate_candidates(target_bpw: float, n: int | None = None) -> dict[int, tuple[int, int]]:
    """Per dim, the (index_bits, group_size) with bpw <= target (for rows of ``n`` weights when
    given) maximising a Gaussian SQNR model: 6.02 dB per index bit per weight, minus the expected
    group range, plus the lattice's gain (hexagonal 0.17 dB, BCC 0.26, D4 0.37)."""
    out: dict[int, tuple[float, tuple[int, int]]] = {}
    for dim in range(1, MAX_DIM + 1):
        groups = range(dim * max(1, 32 // dim), 1025, dim)
        for bits in range(dim, MAX_INDEX_BITS + 1):
            if bits / dim > target_bpw:
                break
            for g in groups:
                bpw = _bpw(dim, bits, g, n)
                if bpw > target_bpw + 1e-9:
                    continue
                score = 6.02 * bits / dim - 20 * math.log10(_expected_range(g)) + (0, 0, 0.17, 0.26, 0.37)[dim]
                if dim not in out or score > out[dim][0] + 1e-9:
                    out[dim] = (score, (bits, g))
    return {d: v[1] for d, v in out.items()}


def choose_rate(target_bpw: float) -> tuple[int, int, int]:
    """(dim, index_bits, group_size) with bpw <= target maximising the model of ``rate_candidates``."""
    best: tuple[float, tuple[int, int, int]] | None = None
    for dim, (bits, g) in rate_candidates(target_bpw).items():
        score = 6.02 * bits / dim - 20 * math.log10(_expected_range(g)) + (0, 0, 0.17, 0.26, 0.37)[dim]
        if best is None or score > best[0] + 1e-9:
            best = (score, (dim, bits, g))
    if best is None:
        raise CodecError(f"codec 'hyperc' cannot reach target_bpw={target_bpw}; use 1.5 or more")
    return best[1]


# ---- the codec ---------------------------------------------------------------------------------
class HyperC(GroupedAffineHealing, Codec, name="hyperc", version=1):
    """Ergodic-trajectory (rank-1 lattice) vector codebook per group: ``index_bits/dim`` bits per
    weight plus an F16 scale and offset per group."""

    # Optional[...] rather than ``X | None``: ``Codec.from_options`` recognises typing.Union only.
    def __init__(self, target_bpw: Optional[float] = None, dim: int = 2, index_bits: int = 9,
                 group_size: int = 128, points: Optional[int] = None, generator: Optional[int] = None,
                 clip_search: bool = True, refine: bool = True, gptq: bool = False, damp: float = 0.01,
                 act_order: bool = True) -> None:
        from .gptq import gptq_options

        self._gptq_config = gptq_options("hyperc", gptq, damp, act_order)
        if gptq and target_bpw is None and dim != 1:
            raise CodecError(f"codec 'hyperc' option 'gptq' needs 1-D codebooks (dim=1), got dim={dim}: GPTQ "
                             "quantises one column at a time")
        self.gptq, self.damp, self.act_order = gptq, damp, act_order
        if target_bpw is not None:
            if isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float)) or not 1.5 <= target_bpw <= 16:
                raise CodecError(f"codec 'hyperc' option 'target_bpw' must be a number in 1.5..16, got {target_bpw!r}")
            dim, index_bits, group_size = choose_rate(float(target_bpw))
        for key, val, lo, hi in (("dim", dim, 1, MAX_DIM), ("index_bits", index_bits, 1, MAX_INDEX_BITS),
                                 ("group_size", group_size, 0, MAX_GROUP)):
            if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
                raise CodecError(f"codec 'hyperc' option {key!r} must be an integer in {lo}..{hi}, got {val!r}")
        if group_size % dim:
            raise CodecError(f"codec 'hyperc' option 'group_size' ({group_size}) must be a multiple of dim ({dim})")
        if points is not None and (isinstance(points, bool) or not isinstance(points, int)
                                   or not 2 <= points <= (1 << index_bits)):
            raise CodecError(f"codec 'hyperc' option 'points' must be an integer in 2..2**index_bits "
                             f"({1 << index_bits}), got {points!r}")
        if generator is not None and (isinstance(generator, bool) or not isinstance(generator, int) or generator < 1):
            raise CodecError(f"codec 'hyperc' option 'generator' must be a positive integer, got {generator!r}")
        if not isinstance(clip_search, bool):
            raise CodecError(f"codec 'hyperc' option 'clip_search' must be true or false, got {clip_search!r}")
        self.target_bpw = target_bpw
        self.dim = dim
        self.index_bits = index_bits
        self.group_size = group_size
        self.points = points
        self.generator = generator
        if not isinstance(refine, bool):
            raise CodecError(f"codec 'hyperc' option 'refine' must be true or false, got {refine!r}")
        self.clip_search = clip_search
        self.refine = refine

    @property
    def needs_input_grams(self) -> bool:
        """The compression pipeline calibrates layer inputs (``runtime/compress/input_stats.py``) when True."""
        return self.gptq

    def _z(self) -> tuple[list[int], int]:
        K = self.points or (1 << self.index_bits)
        a = self.generator if self.generator is not None else good_generator(self.dim, K)
        return _korobov(a % K, self.dim, K), K  # z[0] = 1: the K points are distinct for any a

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        if tuple(weight.shape) != tuple(spec.shape):
            raise CodecError(
                f"tensor {spec.name!r}: weight shape {list(weight.shape)} differs from spec {list(spec.shape)}")
        if not (weight.is_floating_point() or weight.numel() == 0):
            raise CodecError(f"tensor {spec.name!r}: hyperc quantises floating-point weights, got {weight.dtype}; "
                             "use 'raw'")
        m, n = _matrix_shape(tuple(spec.shape))
        w = weight.detach().to("cpu", torch.float32).reshape(m, n)
        if w.numel():
            bad = int((~torch.isfinite(w)).sum())
            if bad:
                raise CodecError(f"tensor {spec.name!r} has {bad} NaN/Inf values; hyperc cannot store them, "
                                 "use 'lossless' or 'raw'")
            peak = float(w.abs().max())
            if peak > F16_MAX / 2:
                raise CodecError(f"tensor {spec.name!r} has |w| up to {peak:g}, beyond the F16 range of hyperc's "
                                 "scale/offset; use 'lossless' or 'raw'")
        gram = ctx.extras.get("input_gram") if self.gptq and len(spec.shape) == 2 and w.numel() else None
        if self.target_bpw is None:
            z, K = self._z()
            g = self.group_size or max(self.dim, -(-n // self.dim) * self.dim)
            return _encode_one(w, z, K, self.index_bits, g, self.clip_search, self.refine, gram, self._gptq_config,
                               spec.name)[0]
        # target_bpw: the model's best (index_bits, group_size) for each dim at this row length
        # (so the tensor's own bpw meets the target), then the one with the lowest squared error.
        found = rate_candidates(float(self.target_bpw), n)
        cands = found or {self.dim: (self.index_bits, self.group_size)}
        if gram is not None:  # GPTQ quantises one column at a time: the 1-D candidate only
            one = found.get(1)
            if one is not None:
                bits, g = one
                K = 1 << bits
                return _encode_one(w, _korobov(good_generator(1, K), 1, K), K, bits, g, self.clip_search,
                                   self.refine, gram, self._gptq_config, spec.name)[0]
        best: tuple[Encoded, float] | None = None
        for dim, (bits, g) in sorted(cands.items()):
            K = 1 << bits
            z = _korobov(good_generator(dim, K), dim, K)
            enc, sse = _encode_one(w, z, K, bits, g, self.clip_search, self.refine)
            log.debug("%s: dim=%d index_bits=%d group_size=%d sse=%.4g", spec.name, dim, bits, g, sse)
            if best is None or sse < best[1]:
                best = (enc, sse)
        return best[0]

    # ---- decoding -----------------------------------------------------------------------------
    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("dim", "index_bits", "points", "generator", "group_size"))
        dim = check_param(cls.name, spec.name, params, "dim", int, 1, MAX_DIM)
        B = check_param(cls.name, spec.name, params, "index_bits", int, 1, MAX_INDEX_BITS)
        K = check_param(cls.name, spec.name, params, "points", int, 2, 1 << B)
        g = check_param(cls.name, spec.name, params, "group_size", int, 1, MAX_GROUP)
        z = params.get("generator")
        if (not isinstance(z, list) or len(z) != dim
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < K for v in z) or z[0] != 1):
            raise CodecError(f"tensor {spec.name!r}: codec 'hyperc' param 'generator' is {z!r}, expected a list of "
                             f"{dim} integers in [0, {K}) starting with 1")
        if g % dim:
            raise CodecError(f"tensor {spec.name!r}: codec 'hyperc' param 'group_size' ({g}) is not a multiple of "
                             f"'dim' ({dim})")
        m, n = _matrix_shape(tuple(spec.shape))
        nv = m * (-(-n // dim))
        groups = -(-n // g)
        out = {"codes_lo": FieldSpec(torch.uint8, (packed_nbytes(nv, min(B, 8)),))}
        if B > 8:
            out["codes_hi"] = FieldSpec(torch.uint8, (packed_nbytes(nv, B - 8),))
        out["scale"] = FieldSpec(torch.float16, (m, groups))
        out["offset"] = FieldSpec(torch.float16, (m, groups))
        return out

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype, closed_form: bool = False,
               fast: bool | None = None) -> Tensor:
        """Decode to ``dtype`` on ``device``. On CUDA with Triton (``fast`` None or True) one kernel
        (``kernels.hyperc.decode``, closed form in fp32 FMA); ``fast=False`` or ``closed_form=True``
        keep this pure-PyTorch reference (the table, or the closed form), which the CPU always runs."""
        f = cls.checked_fields(enc, spec, device)
        p = enc.params
        dev = torch.device(device)
        if fast is None:
            fast = dev.type == "cuda" and not closed_form
        if fast and dev.type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16):
            from .kernels import kernels_available

            if kernels_available(dev):
                from .kernels import hyperc as khyperc

                return khyperc.decode(Encoded(f, p), spec, dtype)
        dim, B, K, z, g = p["dim"], p["index_bits"], p["points"], p["generator"], p["group_size"]
        m, n = _matrix_shape(tuple(spec.shape))
        V = -(-n // dim)
        k = _unpack_index(f, B, m * V)
        if m * V and int(k.max()) >= K:
            raise CorruptPayloadError(f"tensor {spec.name!r}: codec 'hyperc' index {int(k.max())} is beyond "
                                      f"points={K}; the file is damaged or was not written by thawed")
        x = _coords_closed_form(k, z, K) if closed_form else codebook(z, K, k.device)[k.to(torch.int64)]
        x = x.view(m, V * dim)  # [m, V*dim] float32 in [0, 1)
        sc, of = f["scale"].to(torch.float32), f["offset"].to(torch.float32)
        out = torch.empty((m, n), dtype=dtype, device=x.device)
        full = n // g
        if full:
            na = full * g
            torch.addcmul(of[:, :full, None], x[:, :na].view(m, full, g), sc[:, :full, None],
                          out=out[:, :na].view(m, full, g))
        if n % g:
            torch.addcmul(of[:, full:], x[:, full * g:n], sc[:, full:], out=out[:, full * g:])
        return out.view(spec.shape)


def _encode_one(w: Tensor, z: list[int], K: int, B: int, g: int, clip_search: bool,
                refine: bool = True, gram: Tensor | None = None, gptq_config=None,
                name: str = "") -> tuple[Encoded, float]:
    """Encode a float32 ``[m, n]`` matrix with one configuration -> (payload, squared error).
    ``gram`` (1-D codebooks): the group boxes come from the weights as without it (GPTQ's static
    groups), then GPTQ chooses every index with error feedback (``_gptq_indices``)."""
    k, scale, offset, sse = quantize(w, z, K, g, clip_search=clip_search, refine=refine)
    if gram is not None and len(z) == 1:
        k, sse = _gptq_indices(w, K, g, scale, offset, gram, gptq_config, name)
    fields = {"codes_lo": pack_bits(k & 0xFF if B > 8 else k, min(B, 8))}  # [packed_nbytes(m*V, min(B,8))]
    if B > 8:
        fields["codes_hi"] = pack_bits(k >> 8, B - 8)  # [packed_nbytes(m*V, B-8)] uint8
    fields["scale"] = scale.contiguous()  # [m, G] f16
    fields["offset"] = offset.contiguous()  # [m, G] f16
    return Encoded(fields, {"dim": len(z), "index_bits": B, "points": K, "generator": list(z), "group_size": g}), sse


def _gptq_indices(w: Tensor, K: int, g: int, scale16: Tensor, offset16: Tensor, gram: Tensor, config,
                  name: str) -> tuple[Tensor, float]:
    """Indices int64 ``[m*n]`` of a 1-D codebook (point ``j`` = ``j/K``, the decoder's table) chosen
    by GPTQ (``codecs/gptq.py``'s ``grid_codes``) on the fixed group boxes, and the squared weight error."""
    from .gptq import grid_codes

    table = codebook([1], K).view(-1)  # the decoder's values, so encode and decode agree bit for bit
    k, rec = grid_codes(w, gram.to(torch.float32), scale16, offset16, g, table, config, steps_per_unit=K, name=name)
    return k.reshape(-1), float((rec - w).square().sum())


def _unpack_index(f: dict[str, Tensor], B: int, count: int) -> Tensor:
    lo = unpack_codes(f["codes_lo"], min(B, 8), count)
    if B <= 8:
        return lo
    hi = unpack_codes(f["codes_hi"], B - 8, count)
    return lo.to(torch.int32).bitwise_or_(hi.to(torch.int32) << 8)


# ---- quantisation (encode side) ----------------------------------------------------------------
def quantize(w: Tensor, z: list[int], K: int, g: int, *, clip_search: bool = True,
             refine: bool = True) -> tuple[Tensor, Tensor, Tensor, float]:
    """Finite float32 ``[m, n]`` -> indices int64 ``[m*V]``, scale and offset ``[m, G]`` float16,
    and the total squared error.

    ``refine`` (1-D codebooks only, where the trajectory's points are a uniform scalar grid):
    after the box search, HQQ's half-quadratic offset iterations (``rtn._hqq_refine``), keeping
    each group's lowest-squared-error F16 offset, so a group never gets worse."""
    dim = len(z)
    m, n = w.shape
    V = -(-n // dim)
    G = -(-n // g)
    if m * n == 0:
        e = torch.zeros((m, G), dtype=torch.float16)
        return torch.zeros(m * V, dtype=torch.int64), e, e.clone(), 0.0
    # Pad to whole groups with the row's last value: keeps every group's min/max; masked out below.
    pad = G * g - n
    wp = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1) if pad else w
    wg = wp.view(m, G, g)
    mask = None
    if pad:
        mask = torch.ones(G * g)
        mask[n:] = 0
        mask = mask.view(1, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    # Lattice units: coordinates of codebook points are integers in [0, K-1]. The box [lo, hi]
    # maps to [margin, K-1-margin] with a margin of half a codebook spacing K^((d-1)/d).
    margin0 = min(0.5 * K ** ((dim - 1) / dim), (K - 1) / 4)
    factors = CLIP_FACTORS if clip_search else CLIP_FACTORS[:1]
    best_err = best_k = best_s = best_o = None
    for fct, use_margin in factors:
        margin = margin0 if use_margin else 0.0
        span = (K - 1 - 2 * margin) / K  # fraction of [0, 1) the group's range covers
        h = half * fct
        scale16 = _f16_up(2 * h / span)  # 0 for a constant group: it decodes to its offset exactly
        offset16 = _f16_down(mid - h - margin / K * scale16.float())
        offset16 = torch.where(scale16 > 0, offset16, mid.to(torch.float16))
        sc, of = scale16.float(), offset16.float()
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        t = ((wg - of.unsqueeze(-1)) / safe.unsqueeze(-1) * K).clamp_(0, K - 1)  # outliers: onto the box
        k = nearest_index(t.reshape(-1, dim), z, K).view(m, G * g // dim)
        x = codebook(z, K)[k].view(m, G, g)
        err = torch.addcmul(of.unsqueeze(-1), x, sc.unsqueeze(-1)).sub_(wg).square_()
        if mask is not None:
            err.mul_(mask)
        err = err.sum(-1)
        if best_err is None:
            best_err, best_k, best_s, best_o = err, k, scale16, offset16
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, scale16, best_s)
            best_o = torch.where(better, offset16, best_o)
            best_k = torch.where(better.repeat_interleave(g // dim, dim=1), k, best_k)
    if refine and dim == 1:
        best_k, best_o, best_err = _refine_scalar(wg, mask, best_k, best_s, best_o, best_err, z, K)
    k = best_k.view(m, G * g // dim)[:, :V].reshape(-1)
    return k, best_s, best_o, float(best_err.sum())


def _refine_scalar(wg: Tensor, mask: Tensor | None, k: Tensor, scale16: Tensor, offset16: Tensor,
                   err: Tensor, z: list[int], K: int) -> tuple[Tensor, Tensor, Tensor]:
    """HQQ offset refinement of a 1-D codebook (point ``j`` = ``j/K``: a grid of step scale/K)."""
    from .rtn import _hqq_refine

    m, G, g = wg.shape
    step = scale16.float() / K
    q, off = _hqq_refine(wg, k.view(m, G, g).float(), torch.where(step > 0, step, torch.ones_like(step)),
                         offset16, mask, K - 1, HQQ_ITERS)
    # Score with the decoder's own arithmetic; keep the refined group only where it is better.
    kk = q.long().clamp_(0, K - 1)
    x = codebook(z, K)[kk.view(-1)].view(m, G, g)
    e = torch.addcmul(off.float().unsqueeze(-1), x, scale16.float().unsqueeze(-1)).sub_(wg).square_()
    if mask is not None:
        e.mul_(mask)
    e = e.sum(-1)
    better = (e < err) & (scale16 > 0)
    return (torch.where(better.unsqueeze(-1), kk, k.view(m, G, g)).view(m, G * g),
            torch.where(better, off, offset16), torch.where(better, e, err))


def hyperc_decode_reference(enc: Encoded, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Straightforward decode for tests: ``unpack_bits``, closed-form coordinates, per-weight group
    lookup by ``repeat_interleave``."""
    p = enc.params
    dim, B, K, z, g = p["dim"], p["index_bits"], p["points"], p["generator"], p["group_size"]
    m, n = _matrix_shape(tuple(shape))
    V = -(-n // dim)
    k = unpack_bits(enc.fields["codes_lo"], min(B, 8), m * V).to(torch.int64)
    if B > 8:
        k = k + (unpack_bits(enc.fields["codes_hi"], B - 8, m * V).to(torch.int64) << 8)
    x = _coords_closed_form(k, z, K).view(m, V * dim)[:, :n]
    sc = enc.fields["scale"].float().repeat_interleave(g, dim=1)[:, :n]
    of = enc.fields["offset"].float().repeat_interleave(g, dim=1)[:, :n]
    return (x * sc + of).to(dtype).reshape(shape)
