"""``see``: Kronecker-structured ("semantic unit entanglement") encoding of embedding tables and
linear weights, after SEE (arXiv 2412.12204) and MorphTE, fitted post-training.

Two modes (``mode=auto`` picks ``rows`` for the ``embedding``/``lm_head`` roles, ``matrix`` else).

``rows`` -- an embedding table ``[V, d]``. ``d`` is read as ``p x q`` (``p*q >= d``, 576 = 24 x 24;
the tail past ``d`` is truncated). Each token ``i`` is assigned two *semantic units* out of ``K``:
a row-unit ``a_i`` and a column-unit ``b_i``, found by clustering the embedding rows (weighted
k-means of the normalised rows, then k-subspaces refinement; no subword structure is used). Each
unit owns ``R`` factor vectors (``A[a] : R x p``, ``B[b] : R x q``). A row is::

    x_i = mean + ( sum_{r,s} G_i[r,s] * kron(A[a_i, r], B[b_i, s]) )[:d]   (+ residual_i)

with a per-token ``R x R`` mixing core ``G_i`` (quantised to ``core_bits`` with one F16 scale per
token) and the table's mean row stored exactly (F16): on SmolLM2 the mean row is 45 % of the
table's energy, and a tied lm_head turns any per-token error in that shared direction into a
per-token logit shift, so the units fit only what differs between tokens. The core is the post-training departure from MorphTE's pure unit products, which cannot
reproduce a trained table without retraining. Factors and units are fitted to minimise the
reconstruction error weighted by token frequency on calibration text (``ctx.extras["token_freq"]``,
filled by the compression pipeline; ``freq_share`` of the weight follows frequency, the rest is
uniform so rare tokens -- which the tied lm_head still scores -- are not ignored). Any row can be
decoded alone (``decode_rows``): the runtime's embedding gathers and rebuilds only the ids it sees.

``matrix`` -- a weight ``[m, n]`` (``m = m1*m2``, ``n = n1*n2``) is ``sum_r A_r (x) B_r`` (``A_r : m1 x
n1``, ``B_r : m2 x n2``) fitted in closed form (Van Loan-Pitsianis rearrangement + rank-``R`` SVD),
optionally plus a low-bit ``rtn`` residual. ``target_bpw`` picks the largest rank whose total (factors
+ residual, every byte) fits.

Fields (``V`` rows / ``m`` rows, ``L8(x) = ceil(x/8)*8``; ``F`` = float16 factors, or uint8 codes
and an F16 scale per factor vector when ``factor_bits=8``)::

    rows:    A [K, R, p] F, B [K, R, q] F, (A_scale [K, R], B_scale [K, R] f16 when factor_bits=8)
             mean [d] f16
             unit_a, unit_b [V] uint8 (K <= 256) or int16
             core [V, L8(R*R)/8*core_bits] uint8   # row-aligned pack_bits of codes + 2**(core_bits-1)
             core_scale [V] f16
    matrix:  A [R, m1, n1] F, B [R, m2, n2] F (A_scale, B_scale [R] f16 when factor_bits=8)
    residual (both, when residual_bits > 0): res_codes [rows, L8(d)/8*bits] uint8 (row-aligned),
             res_scale, res_offset [rows, ceil(d/group)] f16 -- rtn's layout, one row per table row

Quality floor (SQNR ``20 log10(|W| / |W - W^|)``, measured, tests hold a little below): MiniLM-L6
word embeddings (rows 2000..5999, d=384), rank=12 units=64 core_bits=8: 3.49 dB at 3.41 bpw (rtn
b2 g128: 5.96 dB at 2.25 bpw). SmolLM2's table (PTB-frequency-weighted fit): rank 8 (1.0 bpw, 32x
vs fp32) 3.83 dB; rank 16 core_bits=6 (2.83 bpw, 11.3x) 6.52 dB; rank 4 + 2-bit g64 residual (2.81
bpw, 11.4x) 9.96 dB; rtn b2 g64 (2.5 bpw) 5.19 dB, rtn b3 g128 (3.28 bpw) 10.61 dB. MiniLM layer-0 query [384x384]: rank 16 + 3-bit g128 residual 14.14 dB at 4.69
bpw (rtn b3 g128 13.19 dB at 3.25, b3 g64 14.16 dB at 3.5); pure Kronecker sum rank 64: 3.44 dB at
5.78 bpw. Post-training, trained tables and weights have little Kronecker structure: at equal bpw
``see`` is below ``rtn`` on both (docs/SEE.md has the perplexities).

Decode cost per row: a gather of two units' factors and ``A^T G B`` (``2*R*p*q + 2*R*R*q`` flops,
~6 k multiply-adds per 576-long row at R=8), plus the residual's unpack. The full table is the same
per row, in batches of 8192 small GEMMs (slow on CPU; docs/SEE.md).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params,
                   check_param, row_ids, train_dtype)
from .bitpack import pack_bits
from .errors import CodecError, CorruptPayloadError
from .rtn import F16_MAX, _f16_up, _matrix_shape, expand_groups, quantize, unpack_codes

__all__ = ["See", "see_decode_reference", "pack_rows", "unpack_rows", "rows_bpw", "matrix_bpw", "kron_shape"]

log = logging.getLogger(__name__)

MODES = ("auto", "rows", "matrix")
MAX_UNITS = 32767
_CHUNK = 8192  # rows per decode batch (bounds the [n, p, q] temporary)


# ---- layout helpers ---------------------------------------------------------------------------
def _l8(x: int) -> int:
    return -(-x // 8) * 8


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Row-aligned packing: codes ``[rows, L]`` -> ``[rows, L8(L)/8*bits]`` uint8 (each row starts on
    a byte, so any subset of rows can be unpacked without the others)."""
    rows, width = codes.shape
    pad = torch.zeros(rows, _l8(width), dtype=torch.uint8)
    pad[:, :width] = codes
    return pack_bits(pad, bits).view(rows, _l8(width) // 8 * bits)


def unpack_rows(packed: Tensor, bits: int, width: int) -> Tensor:
    """Inverse of ``pack_rows`` for any gathered subset of rows: ``[n, bytes]`` -> codes ``[n, width]``."""
    n = packed.shape[0]
    return unpack_codes(packed.reshape(-1), bits, n * _l8(width)).view(n, _l8(width))[:, :width]


def kron_shape(m: int, n: int) -> tuple[int, int, int, int]:
    """``(m1, n1, m2, n2)``: ``m = m1*m2``, ``n = n1*n2`` with ``m1``, ``n1`` the largest divisors
    <= sqrt (so ``A`` and ``B`` have similar sizes and the rearranged matrix is near square)."""
    def near_root(x: int) -> int:
        for f in range(math.isqrt(max(x, 1)), 0, -1):
            if x % f == 0:
                return f
        return 1
    m1, n1 = near_root(m), near_root(n)
    return m1, n1, m // m1, n // n1


def _factor_bytes(count_vectors: int, length: int, factor_bits: int) -> int:
    return count_vectors * length * (2 if factor_bits == 16 else 1) + (count_vectors * 2 if factor_bits == 8 else 0)


def _residual_bytes(rows: int, d: int, bits: int, group: int) -> int:
    if not bits:
        return 0
    return rows * _l8(d) // 8 * bits + rows * -(-d // group) * 4


def rows_bpw(v: int, d: int, rank: int, units: int, core_bits: int, factor_bits: int,
             residual_bits: int = 0, residual_group: int = 128) -> float:
    """Exact bits per weight of a ``rows`` payload (every field byte) for a ``[v, d]`` table."""
    from .see_fit import factor_pair

    p, q = factor_pair(d)
    k = min(units, v)
    idx = 1 if k <= 256 else 2
    nbytes = (_factor_bytes(k * rank, p, factor_bits) + _factor_bytes(k * rank, q, factor_bits)
              + 2 * v * idx + v * _l8(rank * rank) // 8 * core_bits + 2 * v + 2 * d
              + _residual_bytes(v, d, residual_bits, residual_group))
    return nbytes * 8 / (v * d)


def matrix_bpw(m: int, n: int, rank: int, factor_bits: int, residual_bits: int = 0,
               residual_group: int = 128) -> float:
    m1, n1, m2, n2 = kron_shape(m, n)
    nbytes = (_factor_bytes(rank, m1 * n1, factor_bits) + _factor_bytes(rank, m2 * n2, factor_bits)
              + _residual_bytes(m, n, residual_bits, residual_group))
    return nbytes * 8 / (m * n)


# ---- factor quantisation ----------------------------------------------------------------------
def _quant_factors(f: Tensor, lead_dims: int) -> tuple[Tensor, Tensor]:
    """Symmetric 8-bit, one F16 scale per factor (the first ``lead_dims`` dims index factors):
    codes uint8 (value + 128), scale f16."""
    flat = f.reshape(*f.shape[:lead_dims], -1)
    scale = _f16_up(flat.abs().amax(-1) / 127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (flat / scale.float().unsqueeze(-1)).round_().clamp_(-127, 127).add_(128).to(torch.uint8)
    return codes.view(f.shape), scale


def _dequant_factors(codes: Tensor, scale: Tensor) -> Tensor:
    flat = codes.reshape(*scale.shape, -1).to(torch.float32).sub_(128).mul_(scale.to(torch.float32).unsqueeze(-1))
    return flat.view(codes.shape)


class See(Codec, name="see", version=1):
    """Kronecker-structured embedding rows (semantic units) and Kronecker-sum linear weights."""

    wants_token_freq = True  # the compression pipeline passes token frequencies for embedding roles

    def __init__(self, mode: str = "auto", rank: Optional[int] = None, target_bpw: Optional[float] = None,
                 units: int = 256, core_bits: int = 8, factor_bits: int = 16, residual_bits: int = 0,
                 residual_group: int = 128, iters: int = 6, freq_share: float = 0.9) -> None:
        def bad(opt: str, want: str, got: Any) -> CodecError:
            return CodecError(f"codec 'see' option {opt!r} must be {want}, got {got!r}")

        if mode not in MODES:
            raise bad("mode", "one of " + ", ".join(MODES), mode)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096):
            raise bad("rank", "an integer in 1..4096", rank)
        if target_bpw is not None:
            if isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float)) or not 0 < target_bpw <= 32:
                raise bad("target_bpw", "a number in (0, 32]", target_bpw)
            if rank is not None:
                raise CodecError("codec 'see': give either 'rank' or 'target_bpw', not both")
        if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= MAX_UNITS:
            raise bad("units", f"an integer in 1..{MAX_UNITS}", units)
        if isinstance(core_bits, bool) or not isinstance(core_bits, int) or not 2 <= core_bits <= 8:
            raise bad("core_bits", "an integer in 2..8", core_bits)
        if factor_bits not in (8, 16) or isinstance(factor_bits, bool):
            raise bad("factor_bits", "8 or 16", factor_bits)
        if isinstance(residual_bits, bool) or residual_bits not in (0, 2, 3, 4, 5, 6, 7, 8):
            raise bad("residual_bits", "0 (no residual) or 2..8", residual_bits)
        if isinstance(residual_group, bool) or not isinstance(residual_group, int) or not 1 <= residual_group <= 1 << 20:
            raise bad("residual_group", "an integer in 1..1048576", residual_group)
        if isinstance(iters, bool) or not isinstance(iters, int) or not 1 <= iters <= 100:
            raise bad("iters", "an integer in 1..100", iters)
        if not isinstance(freq_share, (int, float)) or isinstance(freq_share, bool) or not 0 <= freq_share <= 1:
            raise bad("freq_share", "a number in [0, 1]", freq_share)
        self.mode, self.rank, self.target_bpw, self.units = mode, rank, target_bpw, units
        self.core_bits, self.factor_bits = core_bits, factor_bits
        self.residual_bits, self.residual_group = residual_bits, residual_group
        self.iters, self.freq_share = iters, float(freq_share)

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        if tuple(weight.shape) != tuple(spec.shape):
            raise CodecError(f"tensor {spec.name!r}: weight shape {list(weight.shape)} differs from spec {list(spec.shape)}")
        if not weight.is_floating_point():
            raise CodecError(f"tensor {spec.name!r}: see encodes floating-point weights, got {weight.dtype}; use 'raw'")
        w = weight.detach().to("cpu", torch.float32)
        if w.numel() == 0:
            raise CodecError(f"tensor {spec.name!r} is empty; use 'raw'")
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise CodecError(f"tensor {spec.name!r} has {bad} NaN/Inf values; see cannot fit them, use 'lossless' or 'raw'")
        if float(w.abs().max()) > F16_MAX:
            raise CodecError(f"tensor {spec.name!r} exceeds the F16 range of see's factors; use 'lossless' or 'raw'")
        mode = self.mode
        if mode == "auto":
            mode = "rows" if ctx.role in ("embedding", "lm_head") else "matrix"
        if mode == "rows":
            if w.dim() != 2:
                raise CodecError(f"tensor {spec.name!r}: see mode=rows needs a 2-D table, got shape {list(w.shape)}")
            return self._encode_rows(w, spec, ctx)
        m, n = _matrix_shape(tuple(spec.shape))
        return self._encode_matrix(w.reshape(m, n), spec)

    def _residual(self, fields: dict[str, Tensor], resid: Tensor) -> None:
        if not self.residual_bits:
            return
        q, scale, offset = quantize(resid, self.residual_bits, self.residual_group)
        fields["res_codes"] = pack_rows(q, self.residual_bits)
        fields["res_scale"], fields["res_offset"] = scale.contiguous(), offset.contiguous()

    def _store_factors(self, fields: dict[str, Tensor], name: str, f: Tensor, lead_dims: int) -> Tensor:
        """Store factor tensor ``f`` as field ``name``; returns the values decode will see."""
        if self.factor_bits == 16:
            fields[name] = f.to(torch.float16).contiguous()
            return fields[name].float()
        codes, scale = _quant_factors(f, lead_dims)
        fields[name], fields[name + "_scale"] = codes.contiguous(), scale.contiguous()
        return _dequant_factors(codes, scale)

    def _encode_rows(self, w: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        from .see_fit import factor_pair, fit_units

        v, d = w.shape
        p, q = factor_pair(d)
        k = min(self.units, v)
        rank = self.rank
        if rank is None and self.target_bpw is not None:
            fits = [r for r in range(1, min(p, q) + 1)
                    if rows_bpw(v, d, r, k, self.core_bits, self.factor_bits, self.residual_bits,
                                self.residual_group) <= self.target_bpw + 1e-9]
            if not fits:
                raise CodecError(
                    f"tensor {spec.name!r}: see mode=rows cannot reach target_bpw={self.target_bpw} with "
                    f"units={k}, core_bits={self.core_bits}, residual_bits={self.residual_bits}; raise the "
                    f"target (rank 1 needs {rows_bpw(v, d, 1, k, self.core_bits, self.factor_bits, self.residual_bits, self.residual_group):.3f})"
                )
            rank = fits[-1]
        rank = min(rank or 8, p, q)
        freq = ctx.extras.get("token_freq")
        if freq is None:
            log.warning("tensor %r: no token frequencies given; see fits with uniform token weights", spec.name)
            f = torch.full((v,), 1.0 / v)
        else:
            f = torch.zeros(v)
            src = torch.as_tensor(freq, dtype=torch.float32).reshape(-1)[:v]
            f[: src.numel()] = src.clamp_min(0)
            f = f / f.sum() if float(f.sum()) > 0 else torch.full((v,), 1.0 / v)
        weights = self.freq_share * f + (1.0 - self.freq_share) / v
        fields: dict[str, Tensor] = {"mean": w.mean(0).to(torch.float16)}
        w_full, w = w, w - fields["mean"].float()  # the units fit what differs between rows
        A, B, a, b = fit_units(w, weights * v, p, q, rank, k, self.iters, ctx.seed)  # A [K,p,R], B [K,q,R]
        Aq = self._store_factors(fields, "A", A.transpose(1, 2), 2)  # [K, R, p]
        Bq = self._store_factors(fields, "B", B.transpose(1, 2), 2)  # [K, R, q]
        idx_dtype = torch.uint8 if k <= 256 else torch.int16
        fields["unit_a"], fields["unit_b"] = a.to(idx_dtype), b.to(idx_dtype)
        # Least-squares core against the stored (possibly quantised) factors: pinv(A) X pinv(B)^T.
        pa = torch.linalg.pinv(Aq.transpose(1, 2))  # [K, R, p]
        pb = torch.linalg.pinv(Bq.transpose(1, 2))  # [K, R, q]
        half = 1 << (self.core_bits - 1)
        qmax = half - 1
        codes = torch.empty(v, rank * rank, dtype=torch.uint8)
        cscale = torch.empty(v, dtype=torch.float16)
        for s in range(0, v, _CHUNK):
            xs = torch.zeros(min(_CHUNK, v - s), p * q)
            xs[:, :d] = w[s:s + _CHUNK]
            g = pa[a[s:s + _CHUNK]] @ xs.view(-1, p, q) @ pb[b[s:s + _CHUNK]].transpose(1, 2)  # [c, R, R]
            g = g.reshape(-1, rank * rank)
            sc = _f16_up(g.abs().amax(1) / qmax)
            sc = torch.where(sc > 0, sc, torch.ones_like(sc))
            codes[s:s + _CHUNK] = (g / sc.float()[:, None]).round_().clamp_(-qmax, qmax).add_(half).to(torch.uint8)
            cscale[s:s + _CHUNK] = sc
        fields["core"] = pack_rows(codes, self.core_bits)
        fields["core_scale"] = cscale
        params = {"mode": "rows", "p": p, "q": q, "rank": rank, "units": k, "core_bits": self.core_bits,
                  "factor_bits": self.factor_bits, "residual_bits": self.residual_bits,
                  "residual_group": self.residual_group}
        if self.residual_bits:
            approx = type(self).decode(Encoded(dict(fields), params | {"residual_bits": 0}), spec, {},
                                       torch.device("cpu"), torch.float32)
            self._residual(fields, w_full - approx)
        return Encoded(fields, params)

    def _encode_matrix(self, w: Tensor, spec: TensorSpec) -> Encoded:
        from .see_fit import kron_fit

        m, n = w.shape
        m1, n1, m2, n2 = kron_shape(m, n)
        full = min(m1 * n1, m2 * n2)
        rank = self.rank
        if rank is None and self.target_bpw is not None:
            fits = [r for r in range(1, full + 1)
                    if matrix_bpw(m, n, r, self.factor_bits, self.residual_bits, self.residual_group)
                    <= self.target_bpw + 1e-9]
            if not fits:
                need = matrix_bpw(m, n, 1, self.factor_bits, self.residual_bits, self.residual_group)
                raise CodecError(
                    f"tensor {spec.name!r} [{m}x{n}]: see cannot reach target_bpw={self.target_bpw}; rank 1 "
                    f"with residual_bits={self.residual_bits} needs {need:.3f} bpw -- raise the target or "
                    "lower residual_bits"
                )
            rank = fits[-1]
        rank = min(rank or 8, full)
        A, B = kron_fit(w, m1, n1, m2, n2, rank)
        fields: dict[str, Tensor] = {}
        self._store_factors(fields, "A", A, 1)
        self._store_factors(fields, "B", B, 1)
        params = {"mode": "matrix", "m1": m1, "n1": n1, "m2": m2, "n2": n2, "rank": rank,
                  "factor_bits": self.factor_bits, "residual_bits": self.residual_bits,
                  "residual_group": self.residual_group}
        if self.residual_bits:
            approx = type(self).decode(Encoded(dict(fields), params | {"residual_bits": 0}), spec, {},
                                       torch.device("cpu"), torch.float32).reshape(m, n)
            self._residual(fields, w - approx)
        return Encoded(fields, params)

    # ---- decoding -----------------------------------------------------------------------------
    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("mode", "p", "q", "rank", "units", "core_bits", "m1", "n1", "m2",
                                                          "n2", "factor_bits", "residual_bits", "residual_group"))
        p_ = lambda key, typ, lo=None, hi=None: check_param(cls.name, spec.name, params, key, typ, lo, hi)  # noqa: E731
        mode = p_("mode", str)
        fb = p_("factor_bits", int, 8, 16)
        rb = p_("residual_bits", int, 0, 8)
        rg = p_("residual_group", int, 1, 1 << 20)
        if fb not in (8, 16) or rb == 1:
            raise CodecError(f"tensor {spec.name!r}: codec 'see' params factor_bits={fb} residual_bits={rb} are invalid")
        fdt = torch.float16 if fb == 16 else torch.uint8
        out: dict[str, FieldSpec] = {}
        if mode == "rows":
            if len(spec.shape) != 2:
                raise CodecError(f"tensor {spec.name!r}: codec 'see' mode=rows needs a 2-D tensor, index says {list(spec.shape)}")
            v, d = spec.shape
            p, q = p_("p", int, 1, 1 << 16), p_("q", int, 1, 1 << 16)
            if p * q < d:
                raise CodecError(f"tensor {spec.name!r}: codec 'see' p*q={p * q} is below the row length {d}")
            r = p_("rank", int, 1, min(p, q))
            k = p_("units", int, 1, min(MAX_UNITS, max(v, 1)))
            cb = p_("core_bits", int, 2, 8)
            out["A"], out["B"] = FieldSpec(fdt, (k, r, p)), FieldSpec(fdt, (k, r, q))
            if fb == 8:
                out["A_scale"], out["B_scale"] = FieldSpec(torch.float16, (k, r)), FieldSpec(torch.float16, (k, r))
            idt = torch.uint8 if k <= 256 else torch.int16
            out["unit_a"], out["unit_b"] = FieldSpec(idt, (v,)), FieldSpec(idt, (v,))
            out["core"] = FieldSpec(torch.uint8, (v, _l8(r * r) // 8 * cb))
            out["core_scale"] = FieldSpec(torch.float16, (v,))
            out["mean"] = FieldSpec(torch.float16, (d,))
            rows, width = v, d
        elif mode == "matrix":
            m, n = _matrix_shape(tuple(spec.shape))
            m1, n1, m2, n2 = (p_(x, int, 1, 1 << 31) for x in ("m1", "n1", "m2", "n2"))
            if m1 * m2 != m or n1 * n2 != n:
                raise CodecError(f"tensor {spec.name!r}: codec 'see' factor shapes {m1}x{n1} (x) {m2}x{n2} do not tile [{m}, {n}]")
            r = p_("rank", int, 1, min(m1 * n1, m2 * n2))
            out["A"], out["B"] = FieldSpec(fdt, (r, m1, n1)), FieldSpec(fdt, (r, m2, n2))
            if fb == 8:
                out["A_scale"], out["B_scale"] = FieldSpec(torch.float16, (r,)), FieldSpec(torch.float16, (r,))
            rows, width = m, n
        else:
            raise CodecError(f"tensor {spec.name!r}: codec 'see' param mode={mode!r} is not 'rows' or 'matrix'")
        if rb:
            g = -(-width // rg)
            out["res_codes"] = FieldSpec(torch.uint8, (rows, _l8(width) // 8 * rb))
            out["res_scale"] = FieldSpec(torch.float16, (rows, g))
            out["res_offset"] = FieldSpec(torch.float16, (rows, g))
        return out

    @classmethod
    def _factors(cls, f: dict[str, Tensor], name: str) -> Tensor:
        t = f[name]
        if t.dtype == torch.float16:
            return t.to(torch.float32)
        return _dequant_factors(t, f[name + "_scale"])

    @classmethod
    def _residual_rows(cls, f: dict[str, Tensor], params: Mapping[str, Any], ids: Tensor | None,
                       width: int) -> Tensor:
        bits, g = params["residual_bits"], params["residual_group"]
        codes, scale, offset = f["res_codes"], f["res_scale"], f["res_offset"]
        if ids is not None:
            codes, scale, offset = codes[ids], scale[ids], offset[ids]
        qv = unpack_rows(codes, bits, width).to(torch.float32)
        groups = scale.shape[1]
        padded = torch.zeros(qv.shape[0], groups * g, device=qv.device)
        padded[:, :width] = qv
        out = padded.view(-1, groups, g) * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
        return out.view(-1, groups * g)[:, :width]

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype) -> Tensor:
        f = cls.checked_fields(enc, spec, device)
        if enc.params["mode"] == "rows":
            v = spec.shape[0]
            out = torch.empty(tuple(spec.shape), dtype=dtype, device=f["core"].device)
            for s in range(0, v, _CHUNK):
                ids = torch.arange(s, min(s + _CHUNK, v), device=out.device)
                out[s:s + ids.numel()] = cls._rows(f, enc.params, spec, ids)
            return out
        m, n = _matrix_shape(tuple(spec.shape))
        p = enc.params
        A, B = cls._factors(f, "A"), cls._factors(f, "B")  # [R, m1, n1], [R, m2, n2]
        # W[a*m2+b, c*n2+d] = sum_r A[r,a,c] B[r,b,d]: one R-contraction (a GEMM of [m1*n1, R] x [R, m2*n2]).
        w = (A.reshape(p["rank"], -1).T @ B.reshape(p["rank"], -1)).view(p["m1"], p["n1"], p["m2"], p["n2"])
        w = w.permute(0, 2, 1, 3).reshape(m, n)
        if p["residual_bits"]:
            w = w + cls._residual_rows(f, p, None, n)
        return w.to(dtype).reshape(spec.shape)

    @classmethod
    def _rows(cls, f: dict[str, Tensor], params: Mapping[str, Any], spec: TensorSpec, ids: Tensor) -> Tensor:
        """Float32 rows ``ids`` of a ``rows`` payload (fields already checked and on device)."""
        p, q, r, d = params["p"], params["q"], params["rank"], spec.shape[1]
        a, b = f["unit_a"][ids].long(), f["unit_b"][ids].long()
        if a.numel() and (int(torch.maximum(a.max(), b.max())) >= params["units"]
                          or int(torch.minimum(a.min(), b.min())) < 0):
            raise CorruptPayloadError(f"tensor {spec.name!r}: codec 'see' unit index outside 0..{params['units'] - 1}; the file is damaged")
        half = 1 << (params["core_bits"] - 1)
        g = unpack_rows(f["core"][ids], params["core_bits"], r * r).to(torch.float32).sub_(half)
        g = g.mul_(f["core_scale"][ids].to(torch.float32)[:, None]).view(-1, r, r)
        A, B = cls._factors(f, "A"), cls._factors(f, "B")  # [K, R, p], [K, R, q]
        x = torch.bmm(A[a].transpose(1, 2), torch.bmm(g, B[b]))  # [n, p, q] = A^T G B
        x = x.reshape(-1, p * q)[:, :d] + f["mean"].to(torch.float32)
        if params["residual_bits"]:
            x = x + cls._residual_rows(f, params, ids, d)
        return x

    @classmethod
    def decode_rows(cls, enc: Encoded, spec: TensorSpec, shared: SharedState, ids: Tensor,
                    device: torch.device, dtype: torch.dtype) -> Tensor:
        """Rows ``ids`` (int, any shape ``S``) of the decoded tensor, shape ``S + [d]``, without decoding
        the rest. Equal to ``decode(...)[ids]`` (tested)."""
        flat = row_ids(cls.name, spec, ids, device)
        v, d = spec.shape
        f = cls.checked_fields(enc, spec, device)
        if enc.params["mode"] == "rows":
            out = cls._rows(f, enc.params, spec, flat)
        else:
            p = enc.params
            A, B = cls._factors(f, "A"), cls._factors(f, "B")  # [R, m1, n1], [R, m2, n2]
            ra, rb = torch.div(flat, p["m2"], rounding_mode="floor"), flat % p["m2"]
            # row i = sum_r kron(A[r, i // m2, :], B[r, i % m2, :])
            out = torch.einsum("rkc,rkd->kcd", A[:, ra], B[:, rb]).reshape(-1, d)
            if p["residual_bits"]:
                out = out + cls._residual_rows(f, p, flat, d)
        return out.to(dtype).view(*ids.shape, d)


    # ---- healing ------------------------------------------------------------------------------
    @classmethod
    def trainable_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The unit factors (``A``, ``B`` when stored as F16; their per-vector scales when 8-bit), for
        ``rows`` the per-token core scales and the mean row, and the residual's scales and offsets.
        Unit assignments, core codes and residual codes stay fixed."""
        out = ("A", "B") if params.get("factor_bits") == 16 else ("A_scale", "B_scale")
        if params.get("mode") == "rows":
            out += ("core_scale", "mean")
        if params.get("residual_bits"):
            out += ("res_scale", "res_offset")
        return out

    @classmethod
    def ste_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """``rows``: the per-token core codes (``core_bits`` each), trained straight-through when asked."""
        return ("core",) if params.get("mode") == "rows" else ()

    @classmethod
    def ste_values(cls, name: str, fields: Mapping[str, Tensor], spec: TensorSpec,
                   params: Mapping[str, Any]) -> Tensor:
        if name != "core" or params.get("mode") != "rows":
            return super().ste_values(name, fields, spec, params)
        r, half = params["rank"], 1 << (params["core_bits"] - 1)
        return unpack_rows(fields["core"], params["core_bits"], r * r).to(torch.float32).sub_(half)  # [V, R*R]

    @classmethod
    def ste_pack(cls, name: str, values: Tensor, spec: TensorSpec, params: Mapping[str, Any]) -> Tensor:
        if name != "core" or params.get("mode") != "rows":
            return super().ste_pack(name, values, spec, params)
        half = 1 << (params["core_bits"] - 1)
        codes = values.detach().round().clamp(-half, half - 1).add(half).to(torch.uint8)
        return pack_rows(codes, params["core_bits"])

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        """The SEE formula with every trainable field a float tensor; unit ids, core codes and residual
        codes are read once (``memo``). ``core`` may also be given as float code values
        (``ste_values``): then it is rounded in the forward pass and trained straight-through."""
        dt = train_dtype(fields, cls.trainable_fields(spec, params))
        memo = {} if memo is None else memo

        def factors(name: str) -> Tensor:
            if params["factor_bits"] == 16:
                return fields[name]
            sc = fields[name + "_scale"]
            codes = fields[name].reshape(*sc.shape, -1).to(dt) - 128
            return (codes * sc.unsqueeze(-1)).view(fields[name].shape)

        A, B = factors("A"), factors("B")
        if params["mode"] == "rows":
            v, d = spec.shape
            r, p, q = params["rank"], params["p"], params["q"]
            if "a" not in memo:
                memo["a"], memo["b"] = fields["unit_a"].long(), fields["unit_b"].long()
            half = 1 << (params["core_bits"] - 1)
            if fields["core"].is_floating_point():  # straight-through: round forward, identity backward
                c = fields["core"]
                core = c + (c.round().clamp(-half, half - 1) - c).detach()
            else:
                if "core" not in memo:
                    memo["core"] = cls.ste_values("core", fields, spec, params)
                core = memo["core"].to(dt)
            g = (core * fields["core_scale"][:, None]).view(v, r, r)
            x = torch.bmm(A[memo["a"]].transpose(1, 2), torch.bmm(g, B[memo["b"]]))  # [V, p, q]
            w = x.reshape(v, p * q)[:, :d] + fields["mean"]
            width = d
        else:
            m, n = _matrix_shape(tuple(spec.shape))
            rank = params["rank"]
            w = (A.reshape(rank, -1).T @ B.reshape(rank, -1)).view(params["m1"], params["n1"], params["m2"], params["n2"])
            w = w.permute(0, 2, 1, 3).reshape(m, n)
            width = n
        if params["residual_bits"]:
            if "res" not in memo:
                memo["res"] = unpack_rows(fields["res_codes"], params["residual_bits"], width).to(torch.float32)
            g = params["residual_group"]
            w = w + expand_groups(fields["res_offset"], g, width) + memo["res"].to(dt) * expand_groups(
                fields["res_scale"], g, width)
        return w.reshape(spec.shape)


def see_decode_reference(enc: Encoded, spec: TensorSpec) -> Tensor:
    """Straightforward float32 decode with explicit ``torch.kron`` sums, one row / term at a time
    (slow; for tests): the SEE formula as written in the module docstring."""
    p = enc.params
    f = {k: v.cpu() for k, v in enc.fields.items()}
    A, B = See._factors(f, "A"), See._factors(f, "B")
    if p["mode"] == "rows":
        v, d = spec.shape
        r = p["rank"]
        half = 1 << (p["core_bits"] - 1)
        codes = unpack_rows(f["core"], p["core_bits"], r * r).to(torch.float32) - half
        out = torch.zeros(v, d)
        for i in range(v):
            a, b = int(f["unit_a"][i]), int(f["unit_b"][i])
            g = codes[i].view(r, r) * float(f["core_scale"][i])
            row = sum(g[s, t] * torch.kron(A[a, s], B[b, t]) for s in range(r) for t in range(r))
            out[i] = row[:d] + f["mean"].float()
        width = d
    else:
        m, n = _matrix_shape(tuple(spec.shape))
        out = sum(torch.kron(A[t], B[t]) for t in range(p["rank"]))
        width = n
    if p["residual_bits"]:
        from .rtn import rtn_decode_reference
        from .bitpack import unpack_bits

        rows = out.shape[0]
        q = unpack_bits(f["res_codes"].reshape(-1), p["residual_bits"], rows * _l8(width)).view(rows, _l8(width))
        q = q[:, :width].contiguous()
        out = out + rtn_decode_reference(pack_bits(q, p["residual_bits"]), f["res_scale"], f["res_offset"],
                                         p["residual_bits"], p["residual_group"], (rows, width), torch.float32)
    return out.reshape(spec.shape)
