"""``cvxq``: variable bit depth per group, Laplace-companded levels (after arXiv 2409.02026).

A weight is viewed as ``[m, n]`` like ``rtn`` does (``nn.Linear.weight`` is ``[out, in]``). Its
rows are cut into ``R = ceil(m / G)`` blocks of ``G = group_rows`` output rows (the last block is
padded inside encode/decode only); a *group* is one block x one input column: ``G`` weights that
share a bit depth ``B`` in 0..8, a location and a scale. Groups are numbered row-major over
``[R, n]`` (``k = r * n + j``).

Levels: for ``B >= 1`` the ``2**B`` reconstruction levels are the bin centres of a uniform
quantiser in the domain of a unit Laplace CDF, mapped back by the inverse CDF::

    T_B[q] = -sign(u - 1/2) * ln(1 - 2|u - 1/2|),   u = (q + 1/2) / 2**B
    w ~= T_B[q] * scale + loc

``B = 0`` stores the group as ``loc`` only (its mean). The encoder picks ``loc``/``scale`` per
group by a small grid search (scale multipliers of the group's mean absolute deviation around its
median, then a few location shifts), keeping the candidate with the lowest squared error as it
will be decoded (F16 ``loc``/``scale``); each weight takes its nearest level.

Fields (``K = R * n`` groups, ``c_b`` = number of groups of depth ``b``)::

    depth:  [ceil(K/8) * 4] uint8                  # pack_bits of the K depths, 4 bits each
    loc:    [R, n] float16                         # per group, natural order
    scale:  [K - c_0] float16                      # groups with B >= 1, in depth-sorted order
    codes:  [sum_b ceil(c_b*G/8) * b] uint8        # segments b = 1..8, each pack_bits(., b)
    bias:   [m] float16                            # optional (params "bias": true): bias correction

Depth-sorted order is a stable sort of the groups by depth: segment ``b`` holds the codes of every
depth-``b`` group in increasing group number, ``G`` codes per group (rows in order). A group's bit
offset is therefore ``start_b + rank * G * b`` (its rank among the depth-``b`` groups): the
per-group offsets into the variable-depth stream are implied by the depths, not stored. Params:
``{"group_rows": G, "counts": [c_0, ..., c_8]}`` (data-dependent sizes are params, so the reader
checks every field size before reading). Depths come from the compression plan
(``EncodeContext.extras["cvxq_depth"]``: a ``[R, n]`` integer tensor, see ``runtime/compress/allocate.py``);
without a plan every group gets the encoder option ``bits``.

Bias correction (encoder option ``bias``, on by default, linear layers only, when the planning step
hands the layer's calibration input mean ``E[x]`` in ``extras["cvxq_input_mean"]``): the field
``bias = -(W_hat - W) E[x]`` removes the mean of each output's quantisation error on calibration
text. It cannot be folded into the per-group locations, so the runtime adds it to the layer's
bias (``Codec.decode_output_bias``), creating one on bias-less layers; its 16 bits per output row
count in the tensor's bpw and in the planner's budget.

``gptq=true`` (linear layers with an input Hessian from calibration): depths, locations and scales
are fitted as above on the original weights, then the codes are chosen by the shared GPTQ stage
(``codecs/gptq.py``), one input column (= ``R`` groups) at a time with error feedback; the format
and size do not change; the bias correction is computed from the result.

bpw of a tensor = ``(sum_k G*B_k + 16 K + 16 (K - c_0) + 4 K) / (m n)`` (for ``G`` a multiple of 8
and ``m`` a multiple of ``G``): at ``G = 192`` the side information costs 0.104-0.188 bpw.

Quality floor (MiniLM-L6's genuine fp32 layer-0 linear weights, depths allocated by weight
variance alone, SQNR ``20 log10(|W| / |W - W^|)``, worst tensor / all together): 3.0 bpw
10.6 / 13.4 dB, 4.0 bpw 15.9 / 18.7 dB (rtn g128 at 3.25 / 4.25 bpw: 13.1 / 19.7 dB all
together). tests/test_codec_cvxq.py holds floors a little below; docs/CVXQ.md has all 36 tensors.

Decode cost per weight: unpack a fixed-width field (2-3 byte ops, uniform width inside a segment),
one table gather, one multiply-add, one scatter into the group-major output and one transpose
copy; all in PyTorch on the payload's device (one small sort and one histogram per tensor). On
CUDA, ``decode`` runs the Triton kernel of ``kernels/cvxq.py`` instead (one pass over the codes,
groups located by bit offset from per-chunk depth counts; no host sync), which also has the fused
small-batch decode-matmul of the direct mode.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params, check_param,
                   stored_at_unit, train_dtype)
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .errors import CodecError, CorruptPayloadError
from .kernels import kernels_available
from .rtn import _matrix_shape, unpack_codes

__all__ = ["Cvxq", "levels", "cvxq_nbytes", "group_layout", "group_stats", "cvxq_decode_reference",
           "MAX_DEPTH", "DEPTH_EXTRA"]

MAX_DEPTH = 8
MAX_GROUP_ROWS = 1 << 16
F16_MAX = 65504.0
F16_TINY = 2.0 ** -24
DEPTH_EXTRA = "cvxq_depth"  # EncodeContext.extras key of the planned [R, n] depths
INPUT_MEAN_EXTRA = "cvxq_input_mean"  # EncodeContext.extras key of the linear's calibration E[x], [n]
# Encoder search grids. Scale = multiplier x the group's mean |w - median|; the best multiplier
# grows with the depth (measured on heavy-tailed data: 1.4 at 1 bit .. 5.7 at 8 bits), so each
# depth searches 5 multipliers around its own centre, then 2 location shifts (units of the same
# deviation) at the best scale: 7 candidates per group.
SCALE_CENTRE = (0.0, 1.41, 2.0, 2.83, 3.4, 4.5, 5.0, 5.5, 5.7)
SCALE_STEPS = tuple(2.0 ** e for e in (-0.25, 0.0, 0.25))
LOC_GRID = (-0.1, 0.1)
COVER_STEPS = (1.0, 0.8, 0.64)


def levels(bits: int, device: torch.device | str = "cpu") -> Tensor:
    """The ``2**bits`` unit-scale Laplace inverse-CDF levels at uniform bin centres, float32, ascending."""
    k = 1 << bits
    u = (torch.arange(k, dtype=torch.float64, device=device) + 0.5) / k
    d = u - 0.5
    return (-torch.sign(d) * torch.log1p(-2.0 * d.abs())).to(torch.float32)


def group_layout(shape: tuple[int, ...], group_rows: int) -> tuple[int, int, int, int]:
    """``(m, n, G, R)`` for a tensor shape: ``G = min(group_rows, m)`` rows per block, ``R`` blocks."""
    m, n = _matrix_shape(tuple(shape))
    g = max(1, min(group_rows, m))
    return m, n, g, -(-m // g)


def cvxq_nbytes(groups: int, group_rows: int, counts: list[int] | tuple[int, ...], bias_rows: int = 0) -> int:
    """Every stored byte of a tensor with ``groups`` groups of ``group_rows`` rows and these depth
    counts (plus ``bias_rows`` F16 bias corrections)."""
    codes = sum(packed_nbytes(c * group_rows, b) for b, c in enumerate(counts) if b)
    return packed_nbytes(groups, 4) + 2 * groups + 2 * (groups - counts[0]) + codes + 2 * bias_rows


def _grouped(w: Tensor, g: int, r: int) -> tuple[Tensor, Tensor | None]:
    """[m, n] -> groups [R*n, G] (rows of a block along the last dim) and a validity mask or None."""
    m, n = w.shape
    pad = r * g - m
    mask = None
    if pad:
        w = torch.cat([w, w[-1:].expand(pad, n)], 0)
        mask = torch.ones(r * g, dtype=torch.bool)
        mask[m:] = False
        mask = mask.view(r, 1, g).expand(r, n, g).reshape(r * n, g)
    return w.view(r, g, n).permute(0, 2, 1).reshape(r * n, g), mask


def group_stats(weight: Tensor, group_rows: int, sens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ``(variance, mean sensitivity, valid count)`` as float64 [R*n] tensors.

    ``sens`` is a per-weight sensitivity of the weight's shape (e.g. accumulated squared
    gradients); ``None`` means 1 everywhere. Used by the planner (``runtime/compress/allocate.py``).
    """
    m, n, g, r = group_layout(tuple(weight.shape), group_rows)
    w = weight.detach().to("cpu", torch.float32).reshape(m, n)
    wg, mask = _grouped(w, g, r)
    cnt = mask.sum(-1).double() if mask is not None else torch.full((r * n,), float(g), dtype=torch.float64)
    wd = wg.double()
    if mask is not None:
        wd = wd * mask
    mean = wd.sum(-1) / cnt
    dev = wd - mean[:, None]
    if mask is not None:
        dev = dev * mask
    var = dev.square().sum(-1) / cnt
    if sens is None:
        s = torch.ones_like(var)
    else:
        sg, _ = _grouped(sens.detach().to("cpu", torch.float32).reshape(m, n), g, r)
        sd = sg.double()
        if mask is not None:
            sd = sd * mask
        s = sd.sum(-1) / cnt
    return var, s, cnt


class Cvxq(Codec, name="cvxq", version=1):
    """Per-group bit depth 0..8 (``G`` output rows x 1 input column), Laplace-companded levels."""

    def __init__(self, group_rows: int = 192, bits: int = 4, bias: bool = True, gptq: bool = False,
                 damp: float = 0.01, act_order: bool = True) -> None:
        if isinstance(group_rows, bool) or not isinstance(group_rows, int) or not 1 <= group_rows <= MAX_GROUP_ROWS:
            raise CodecError(
                f"codec 'cvxq' option 'group_rows' must be an integer in 1..{MAX_GROUP_ROWS}, got {group_rows!r} "
                "(a multiple of 8 that divides the output dimensions, e.g. 192 for SmolLM2)"
            )
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_DEPTH:
            raise CodecError(f"codec 'cvxq' option 'bits' must be an integer in 0..{MAX_DEPTH}, got {bits!r}")
        if not isinstance(bias, bool):
            raise CodecError(f"codec 'cvxq' option 'bias' must be true or false, got {bias!r}")
        from .gptq import gptq_options

        self._gptq_config = gptq_options("cvxq", gptq, damp, act_order)
        self.group_rows = group_rows
        self.bits = bits
        self.bias = bias
        self.gptq, self.damp, self.act_order = gptq, damp, act_order

    @property
    def needs_input_grams(self) -> bool:
        """The compression pipeline calibrates layer inputs (``runtime/compress/input_stats.py``) when True."""
        return self.gptq

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        if tuple(weight.shape) != tuple(spec.shape):
            raise CodecError(
                f"tensor {spec.name!r}: weight shape {list(weight.shape)} differs from spec {list(spec.shape)}"
            )
        if not (weight.is_floating_point() or weight.numel() == 0):
            raise CodecError(
                f"tensor {spec.name!r}: cvxq quantises floating-point weights, got {weight.dtype}; use 'raw'"
            )
        m, n, g, r = group_layout(tuple(spec.shape), self.group_rows)
        w = weight.detach().to("cpu", torch.float32).reshape(m, n)
        if w.numel():
            bad = int((~torch.isfinite(w)).sum())
            if bad:
                raise CodecError(
                    f"tensor {spec.name!r} has {bad} NaN/Inf values; cvxq cannot store them, use 'lossless' or 'raw'"
                )
            peak = float(w.abs().max())
            if peak > F16_MAX / 8:
                raise CodecError(
                    f"tensor {spec.name!r} has |w| up to {peak:g}, beyond the range of cvxq's F16 location/scale; "
                    "use 'lossless' or 'raw'"
                )
        k = r * n
        depth = ctx.extras.get(DEPTH_EXTRA)
        if depth is None:
            depth = torch.full((k,), self.bits, dtype=torch.int64)
        else:
            depth = torch.as_tensor(depth).to("cpu", torch.int64).reshape(-1)
            if depth.numel() != k:
                raise CodecError(
                    f"tensor {spec.name!r}: the plan gives {depth.numel()} group depths, cvxq with group_rows="
                    f"{self.group_rows} needs {k} ([{r}, {n}]); plan and encode with the same group_rows"
                )
            if k and (int(depth.min()) < 0 or int(depth.max()) > MAX_DEPTH):
                raise CodecError(f"tensor {spec.name!r}: planned depths must be in 0..{MAX_DEPTH}")
        counts = torch.bincount(depth, minlength=MAX_DEPTH + 1).tolist() if k else [0] * (MAX_DEPTH + 1)
        wg, mask = _grouped(w, g, r) if k else (torch.zeros(0, g), None)
        loc = torch.zeros(k, dtype=torch.float16)
        order = torch.argsort(depth, stable=True)
        scales: list[Tensor] = []
        codes: list[tuple[int, Tensor, Tensor]] = []  # (depth, group ids, codes [c, G])
        sc_all = torch.zeros(k, dtype=torch.float16)
        start = 0
        for b, c in enumerate(counts):
            idx = order[start:start + c]
            start += c
            if not c:
                continue
            x = wg[idx]
            mk = mask[idx] if mask is not None else None
            if b == 0:
                loc[idx] = _masked_mean(x, mk).clamp(-F16_MAX, F16_MAX).to(torch.float16)
                continue
            q, lo16, sc16 = _quantise_groups(x, mk, b)
            loc[idx] = lo16
            sc_all[idx] = sc16
            scales.append(sc16)
            codes.append((b, idx, q))
        gram = ctx.extras.get("input_gram") if self.gptq else None
        if gram is not None and k and spec.role == "linear" and len(spec.shape) == 2:
            codes = self._gptq_codes(w, depth, loc, sc_all, codes, gram, spec.name)
        segments = [pack_bits(q.reshape(-1), b) for b, _, q in codes]
        fields = {
            "depth": pack_bits(depth, 4),  # [ceil(K/8)*4] uint8
            "loc": loc.view(r, n).contiguous(),  # [R, n] f16
            "scale": (torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float16)).contiguous(),  # [K-c0]
            "codes": (torch.cat(segments) if segments else torch.zeros(0, dtype=torch.uint8)).contiguous(),
        }
        params: dict[str, Any] = {"group_rows": self.group_rows, "counts": [int(c) for c in counts]}
        mean_x = ctx.extras.get(INPUT_MEAN_EXTRA)
        if self.bias and mean_x is not None and spec.role == "linear" and w.numel():
            mean_x = torch.as_tensor(mean_x, dtype=torch.float32).reshape(-1)
            if mean_x.numel() != n:
                raise CodecError(f"tensor {spec.name!r}: the calibration input mean has {mean_x.numel()} values, "
                                 f"the weight has {n} input columns")
            w_hat = type(self).decode(Encoded(fields, params), spec, {}, torch.device("cpu"), torch.float32)
            corr = -((w_hat.reshape(m, n).double() - w.double()) @ mean_x.double())
            fields["bias"] = corr.clamp(-F16_MAX, F16_MAX).to(torch.float16).contiguous()  # [m] f16
            params["bias"] = True
        return Encoded(fields, params)

    def _gptq_codes(self, w: Tensor, depth: Tensor, loc16: Tensor, sc16: Tensor,
                    codes: list[tuple[int, Tensor, Tensor]], gram: Tensor, name: str) -> list[tuple[int, Tensor, Tensor]]:
        """GPTQ (``codecs/gptq.py``) on the fixed groups: depths, locations and scales stay as planned
        and fitted on the original weights; only the codes change. Column ``j`` holds the ``R``
        groups ``r * n + j``, each quantised to its depth's levels."""
        from .gptq import gptq

        m, n = w.shape
        g = self.group_rows
        r = -(-m // g)
        rows = torch.arange(m)
        grp_of_row = rows // g  # [m]
        pos_in_grp = rows % g
        dep = depth.view(r, n)
        lo = loc16.float().view(r, n)
        sc = sc16.float().view(r, n)
        tables = [levels(b) for b in range(MAX_DEPTH + 1)]
        q_all = torch.zeros(r * n, g, dtype=torch.int64)

        def column(j: int, col: Tensor) -> Tensor:
            out = lo[grp_of_row, j].clone()
            for b in torch.unique(dep[:, j]).tolist():
                if b == 0:
                    continue
                sel = (dep[grp_of_row, j] == b)
                rr = grp_of_row[sel]
                z = (col[sel] - lo[rr, j]) / sc[rr, j]
                q = _nearest(z, tables[b])
                out[sel] = tables[b][q] * sc[rr, j] + lo[rr, j]
                q_all[rr * n + j, pos_in_grp[sel]] = q
            return out

        gptq(w, gram, column, self._gptq_config, name=name)
        return [(b, idx, q_all[idx]) for b, idx, _ in codes]

    # ---- decoding -----------------------------------------------------------------------------
    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("group_rows", "counts", "bias"))
        gr = check_param(cls.name, spec.name, params, "group_rows", int, 1, MAX_GROUP_ROWS)
        counts = check_param(cls.name, spec.name, params, "counts", list)
        m, n, g, r = group_layout(tuple(spec.shape), gr)
        k = r * n
        if (len(counts) != MAX_DEPTH + 1 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)
                or sum(counts) != k):
            raise CodecError(
                f"tensor {spec.name!r}: codec 'cvxq' param 'counts' must be {MAX_DEPTH + 1} non-negative integers "
                f"summing to the {k} groups of a {list(spec.shape)} tensor, got {counts!r}"
            )
        codes = sum(packed_nbytes(c * g, b) for b, c in enumerate(counts) if b)
        out = {
            "depth": FieldSpec(torch.uint8, (packed_nbytes(k, 4),)),
            "loc": FieldSpec(torch.float16, (r, n)),
            "scale": FieldSpec(torch.float16, (k - counts[0],)),
            "codes": FieldSpec(torch.uint8, (codes,)),
        }
        if "bias" in params:
            if params["bias"] is not True:
                raise CodecError(f"tensor {spec.name!r}: codec 'cvxq' param 'bias' must be true when present, "
                                 f"got {params['bias']!r}")
            out["bias"] = FieldSpec(torch.float16, (m,))
        return out

    @classmethod
    def has_output_bias(cls, params: Mapping[str, Any]) -> bool:
        return params.get("bias") is True

    @classmethod
    def decode_output_bias(cls, enc: Encoded, spec: TensorSpec, device: torch.device,
                           dtype: torch.dtype) -> Tensor | None:
        if not cls.has_output_bias(enc.params):
            return None
        return cls.checked_fields(enc, spec, device)["bias"].to(dtype)

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype, fused: bool | None = None,
               fast: bool | None = None) -> Tensor:
        """Per-depth segments, one vectorised pass each (the reference); ``fused`` (default: on
        CUDA) decodes every group in one pass instead, which launches ~20 kernels per tensor
        rather than ~10 per depth present -- the GPU is launch-bound on these small tensors.
        ``fast`` (default: on CUDA when Triton imports) runs the Triton kernel
        (``kernels/cvxq.py``: 3 launches, no host sync, no depth-histogram check) instead."""
        dev = torch.device(device)
        if fast is None:
            fast = dev.type == "cuda" and kernels_available(dev)
        if fast and dtype in (torch.float32, torch.bfloat16, torch.float16):
            from .kernels import cvxq as _kernels

            return _kernels.decode(Encoded(cls.checked_fields(enc, spec, dev), enc.params), spec, dtype)
        f = cls.checked_fields(enc, spec, device)
        counts = enc.params["counts"]
        m, n, g, r = group_layout(tuple(spec.shape), enc.params["group_rows"])
        k = r * n
        dev = f["loc"].device
        if k == 0:
            return torch.empty(spec.shape, dtype=dtype, device=dev)
        depth = unpack_codes(f["depth"], 4, k).long()
        hist = torch.bincount(depth, minlength=16)
        if hist.tolist()[: MAX_DEPTH + 1] != list(counts) or int(hist[MAX_DEPTH + 1:].sum()) != 0:
            raise CorruptPayloadError(
                f"tensor {spec.name!r}: codec 'cvxq' group depths do not match the index's counts "
                f"{list(counts)}; the file is damaged or was not written by thawed"
            )
        order = torch.argsort(depth, stable=True)
        loc = f["loc"].reshape(-1).to(torch.float32)
        scale = f["scale"].to(torch.float32)
        codes = f["codes"]
        if fused is None:
            fused = dev.type == "cuda"
        if fused:
            out = _decode_fused(depth, order, loc, scale, codes, counts, g)
            return out.view(r, n, g).transpose(1, 2).reshape(r * g, n)[:m].to(dtype).reshape(spec.shape)
        out = torch.empty((k, g), dtype=torch.float32, device=dev)  # group-major
        c0 = counts[0]
        if c0:
            i0 = order[:c0]
            out.index_copy_(0, i0, loc[i0, None].expand(c0, g))
        start, sstart, byte = c0, 0, 0
        for b in range(1, MAX_DEPTH + 1):
            c = counts[b]
            if not c:
                continue
            idx = order[start:start + c]
            nb = packed_nbytes(c * g, b)
            q = unpack_codes(codes[byte:byte + nb], b, c * g).view(c, g).long()
            vals = levels(b, dev)[q]
            vals.mul_(scale[sstart:sstart + c, None]).add_(loc[idx, None])
            out.index_copy_(0, idx, vals)
            start, sstart, byte = start + c, sstart + c, byte + nb
        w = out.view(r, n, g).transpose(1, 2).reshape(r * g, n)[:m]
        return w.to(dtype).reshape(spec.shape)


    # ---- healing ------------------------------------------------------------------------------
    @classmethod
    def trainable_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Every group's location and (depth >= 1) scale; depths and codes stay fixed. The stored bias
        correction is not trained (it is added to the layer's output, not part of the weight)."""
        return ("loc", "scale")

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        """``T_B[q] * scale + loc`` per group, with the levels ``T_B[q]`` and each group's scale slot
        computed once (``memo``)."""
        dt = train_dtype(fields, ("loc", "scale"))
        m, n, g, r = group_layout(tuple(spec.shape), params["group_rows"])
        memo = {} if memo is None else memo
        if "unit" not in memo:
            unit = cls.decode(Encoded(stored_at_unit(fields, ("scale",), ("loc",)), dict(params)), spec, shared,
                              fields["loc"].device, torch.float32, fused=False, fast=False).reshape(m, n)
            depth = unpack_codes(fields["depth"], 4, r * n).long()
            order = torch.argsort(depth, stable=True)
            pos = torch.empty_like(order)
            pos[order] = torch.arange(order.numel(), device=order.device)
            c0 = params["counts"][0]
            slot = torch.where(depth > 0, pos - c0, torch.full_like(pos, fields["scale"].numel()))
            memo["unit"], memo["slot"] = unit, slot.view(r, n)
        sp = torch.cat([fields["scale"], fields["scale"].new_zeros(1)])  # depth-0 groups: scale 0
        sc = sp[memo["slot"]].repeat_interleave(g, dim=0)[:m]  # [m, n]
        lo = fields["loc"].repeat_interleave(g, dim=0)[:m]
        return (lo + memo["unit"].to(dt) * sc).reshape(spec.shape)


def _level_table(device: torch.device) -> Tensor:
    """[9, 256] float32: row b holds ``levels(b)`` (row 0 and the unused tail are zero); built in one
    vectorised pass with ``levels``' float64 arithmetic, so the values are identical."""
    b = torch.arange(MAX_DEPTH + 1, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(256, dtype=torch.float64, device=device)[None, :]
    k = torch.exp2(b)
    d = (j + 0.5) / k - 0.5
    lv = -torch.sign(d) * torch.log1p(-2.0 * d.abs())
    return torch.where((j < k) & (b > 0), lv, torch.zeros_like(lv)).to(torch.float32)


def _decode_fused(depth: Tensor, order: Tensor, loc: Tensor, scale: Tensor, codes: Tensor,
                  counts: list[int], g: int) -> Tensor:
    """Every group at once -> [K, G] float32, group-major. Group ``i`` of depth ``b`` and rank ``j``
    among the depth-``b`` groups has its ``G`` codes at bit ``8 * seg_b + j * G * b`` of the LSB-first
    stream (``bitpack``'s layout is a contiguous little-endian bit stream), so each code is two
    gathered bytes, a shift and a mask; then one table gather and one multiply-add."""
    dev = depth.device
    k = depth.numel()
    c = torch.tensor(counts, dtype=torch.int64, device=dev)
    seg_bytes = torch.tensor([0] + [packed_nbytes(counts[b] * g, b) if counts[b] else 0 for b in range(1, MAX_DEPTH + 1)],
                             dtype=torch.int64, device=dev)
    seg_start = torch.cumsum(seg_bytes, 0) - seg_bytes  # byte start of each depth's segment
    first = torch.cumsum(c, 0) - c  # sorted position of each depth's first group
    pos = torch.empty(k, dtype=torch.int64, device=dev)
    pos[order] = torch.arange(k, device=dev)
    rank = pos - first[depth]
    idx_t = torch.int32 if codes.numel() * 8 + 8 * g * MAX_DEPTH < 2**31 else torch.int64
    base = (seg_start[depth] * 8 + rank * (g * depth)).to(idx_t)  # [K] bit offset of the group's first code
    bit = base[:, None] + torch.arange(g, device=dev, dtype=idx_t)[None, :] * depth.to(idx_t)[:, None]  # [K, G]
    padded = torch.cat([codes, codes.new_zeros(2)]).to(torch.int32)
    byte = bit >> 3
    word = padded[byte] | (padded[byte + 1] << 8)
    q = (word >> (bit & 7).to(torch.int32)) & ((1 << depth.to(torch.int32)) - 1)[:, None]
    vals = _level_table(dev).view(-1)[depth[:, None] * 256 + q.long()]
    sp = torch.cat([scale, scale.new_zeros(1)])  # depth-0 groups read the trailing 0 (no boolean
    sc = sp[torch.where(depth > 0, pos - counts[0], sp.numel() - 1)]  # mask: that would sync the GPU)
    return torch.addcmul(loc[:, None], vals, sc[:, None])


# ---- quantisation (encode side) ---------------------------------------------------------------
def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean(-1)
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def _nearest(z: Tensor, lv: Tensor) -> Tensor:
    """Index of the nearest level (ascending ``lv``) for every element of ``z``."""
    mids = (lv[1:] + lv[:-1]) * 0.5
    return torch.bucketize(z, mids)


def _quantise_groups(x: Tensor, mask: Tensor | None, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Groups [c, G] float32 -> codes [c, G] (int64), loc [c] f16, scale [c] f16 (best of the grid)."""
    lv = levels(bits)
    if mask is not None:  # padded entries: replaced by a valid value of their group, and masked out
        med = torch.nanmedian(torch.where(mask, x, torch.nan), dim=-1).values
        x = torch.where(mask, x, med[:, None])
    else:
        med = x.median(dim=-1).values
    mad = _masked_mean((x - med[:, None]).abs(), mask).clamp_min(F16_TINY)

    def evaluate(lo: Tensor, sc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lo16 = lo.clamp(-F16_MAX, F16_MAX).to(torch.float16)
        sc16 = sc.clamp(F16_TINY, F16_MAX).to(torch.float16)
        lo32, sc32 = lo16.float()[:, None], sc16.float()[:, None]
        q = _nearest((x - lo32) / sc32, lv)
        err = (lv[q] * sc32 + lo32 - x).square_()
        if mask is not None:
            err = err * mask
        return err.sum(-1), q, lo16, sc16

    # Scales whose outermost level reaches the group's extreme weight (never clip an outlier) or
    # part of the way there, next to the grid around the depth's typical multiplier.
    reach = (x - med[:, None]).abs()
    if mask is not None:
        reach = reach * mask
    cover = reach.amax(-1) / float(lv[-1])
    best = None
    for cand_scale in [mad * (SCALE_CENTRE[bits] * step) for step in SCALE_STEPS] + [cover * f for f in COVER_STEPS]:
        cand = evaluate(med, cand_scale)
        best = cand if best is None else _keep_better(best, cand)
    base_sc = best[3].float()
    for shift in LOC_GRID:  # location search at the best scale
        best = _keep_better(best, evaluate(med + shift * mad, base_sc))
    _, q, lo16, sc16 = best
    return q, lo16, sc16


def _keep_better(a: tuple, b: tuple) -> tuple:
    better = b[0] < a[0]
    return (torch.where(better, b[0], a[0]), torch.where(better[:, None], b[1], a[1]),
            torch.where(better, b[2], a[2]), torch.where(better, b[3], a[3]))


def cvxq_decode_reference(enc: Encoded, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Slow decode for tests: per-group bit offsets into the stream, one group at a time."""
    counts = enc.params["counts"]
    m, n, g, r = group_layout(tuple(shape), enc.params["group_rows"])
    k = r * n
    depth = unpack_bits(enc.fields["depth"], 4, k).long().tolist() if k else []
    loc = enc.fields["loc"].reshape(-1).float()
    scale = enc.fields["scale"].float()
    # per-group bit offsets: segment starts (bytes) + rank within the segment * G * b bits
    seg_start, byte = {}, 0
    for b in range(1, MAX_DEPTH + 1):
        seg_start[b] = byte * 8
        byte += packed_nbytes(counts[b] * g, b)
    bitstream = torch.from_numpy(__import__("numpy").unpackbits(enc.fields["codes"].numpy(), bitorder="little"))
    rank = [0] * (MAX_DEPTH + 1)
    sidx = {}
    s = 0
    for b in range(1, MAX_DEPTH + 1):  # scale index of the first group of each depth
        sidx[b] = s
        s += counts[b]
    wp = torch.zeros(r * g, n)
    for grp in range(k):
        b = depth[grp]
        rr, j = divmod(grp, n)
        if b == 0:
            wp[rr * g:(rr + 1) * g, j] = loc[grp]
            continue
        off = seg_start[b] + rank[b] * g * b
        bits = bitstream[off:off + g * b].view(g, b).long()
        q = (bits << torch.arange(b)).sum(1)
        wp[rr * g:(rr + 1) * g, j] = levels(b)[q] * scale[sidx[b] + rank[b]] + loc[grp]
        rank[b] += 1
    return wp[:m].to(dtype).reshape(shape)
