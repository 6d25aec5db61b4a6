"""``rtn``: group affine (round-to-nearest) quantisation, optionally refined HQQ-style.

A weight is viewed as a matrix ``[m, n]`` over its last dimension: a 2-D ``[m, n]`` weight as it
is, a k-D one as ``[prod(shape[:-1]), shape[-1]]``, a 1-D ``[n]`` one as ``[1, n]`` and a 0-d one as
``[1, 1]``. Each row is cut into groups of ``group_size`` consecutive weights along ``n`` (the
input dimension of ``nn.Linear.weight``); when ``n % group_size != 0`` the last group of every row
is partial (padded inside encode/decode only, never stored). Per group::

    w ~= q * scale + offset,   q in [0, 2**bits - 1]

Fields (``G = ceil(n / group_size)``)::

    codes:  [ceil(m*n/8) * bits] uint8   # pack_bits of the m*n codes, row-major (bits == 8: [m*n])
    scale:  [m, G] float16
    offset: [m, G] float16               # the group minimum, not a zero point: no F16 overflow

Params: ``{"bits": 2..8, "group_size": >= 1}``. bpw = bits + 32 / group_size (aligned shapes).

Encoding works in float32: the offset is the group minimum rounded *down* to F16 and the scale
``(max - offset) / (2**bits - 1)`` rounded *up* to F16, so the stored grid covers the group; the
codes are computed from those F16 values, so encode and decode agree exactly. A zero-range group
gets scale 1 and codes 0. ``hqq=True`` adds the calibration-free half-quadratic refinement of HQQ
(lp-norm p=0.7, beta=10, kappa=1.01): the offset of every group is re-fitted as a mean, the scale
stays; per group the iterate with the lowest squared error (plain RTN included) is kept, so it is
never worse than plain RTN. ``gptq=true`` adds GPTQ error feedback (``codecs/gptq.py``: the
layer's input Hessian from calibration, ``damp`` dampening, lazy block updates, ``act_order``):
the group scales and offsets are fixed first from the original weights (plain or HQQ), then the
codes are chosen column by column with each column's rounding error pushed onto the columns not
yet rounded. A tied embedding gets the lm_head's input Hessian (the final norm's output,
``runtime/compress/input_stats.py``); tensors without one (an untied embedding) are rounded
plainly. ``clip_search=true`` picks each group's range before that: the shrink ``a`` of ``[min,
max]`` to ``[a min, a max]`` (``a`` from 1.0 down to 0.6 in steps of 0.025) with the lowest squared
error, each column weighted by its input's E[x^2] when calibration gives it (GPTQ's ``mse`` grid
search). On SmolLM2 at b3 g128 with GPTQ it halves PTB valid perplexity (260 -> 131, dense 53.2;
docs/HEAL.md). Decoding is identical in every case: the stored format does not change.

Quality floor (MiniLM-L6's 36 genuine fp32 encoder linear weights, SQNR
``20 log10(|W| / |W - W^|)``, worst tensor / all tensors together):
4-bit g128 (4.25 bpw): 18.2 / 19.4 dB, with hqq 18.8 / 19.7 dB;
3-bit g128 (3.25 bpw): 11.9 / 12.9 dB, with hqq 12.2 / 13.1 dB.
tests/test_codec_rtn.py holds floors a little below these.

Decode cost per weight: unpack (2-3 byte ops; uint8 shifts when bits divides 8) plus one fused
``q * scale + offset`` (float32, cast on store to the output dtype). Measured on 2 CPU cores over
SmolLM2-135M's shapes (134.5 M weights, g128): 4-bit 0.16 s to float32 (1.2 ns/weight), 0.18 s to
bfloat16; 3-bit 0.45 s (3.3 ns/weight).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params,
                   check_param, row_ids, stored_at_unit, train_dtype)
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .errors import CodecError
from .kernels import kernels_available

__all__ = ["Rtn", "GroupedAffineHealing", "rtn_decode_reference", "unpack_codes", "expand_groups", "grouped_affine_train"]

log = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 2, 8
MAX_GROUP = 1 << 20
F16_MAX = 65504.0
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what kernels/rtn.py writes
# HQQ's solver settings (Badri & Shaji 2023, "Half-Quadratic Quantization of Large ML Models").
HQQ_P, HQQ_BETA, HQQ_KAPPA = 0.7, 10.0, 1.01


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[m, n]`` view of a tensor shape: groups run along the last dimension."""
    if len(shape) == 0:
        return 1, 1
    n = int(shape[-1])
    m = 1
    for d in shape[:-1]:
        m *= int(d)
    return m, n


class GroupedAffineHealing:
    """Healing of a payload decoded as ``code value * scale + offset`` per group (rtn, hyperc): the
    group scales and offsets are trainable, the codes stay fixed (``grouped_affine_train``)."""

    @classmethod
    def trainable_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        return ("scale", "offset")

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        """The codec's decode with the code values computed once (kept in ``memo``)."""
        return grouped_affine_train(cls.decode, fields, spec, params, shared, memo)


class Rtn(GroupedAffineHealing, Codec, name="rtn", version=1):
    """Group affine quantisation, ``bits`` 2..8 per weight plus an F16 scale and offset per group."""

    def __init__(self, bits: int = 4, group_size: int = 128, hqq: bool = False, hqq_iters: int = 20,
                 gptq: bool = False, damp: float = 0.01, act_order: bool = True, clip_search: bool = False) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise CodecError(f"codec 'rtn' option 'bits' must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP:
            raise CodecError(
                f"codec 'rtn' option 'group_size' must be an integer in 1..{MAX_GROUP}, got {group_size!r} "
                "(128 is the usual choice)"
            )
        for opt, v in (("hqq", hqq), ("clip_search", clip_search)):
            if not isinstance(v, bool):
                raise CodecError(f"codec 'rtn' option {opt!r} must be true or false, got {v!r}")
        if isinstance(hqq_iters, bool) or not isinstance(hqq_iters, int) or not 0 <= hqq_iters <= 1000:
            raise CodecError(f"codec 'rtn' option 'hqq_iters' must be an integer in 0..1000, got {hqq_iters!r}")
        from .gptq import gptq_options

        self._gptq_config = gptq_options("rtn", gptq, damp, act_order)
        self.bits = bits
        self.group_size = group_size
        self.hqq = hqq
        self.hqq_iters = hqq_iters
        self.clip_search = clip_search
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
                f"tensor {spec.name!r}: rtn quantises floating-point weights, got {weight.dtype}; use 'raw'"
            )
        m, n = _matrix_shape(tuple(spec.shape))
        w = weight.detach().to("cpu", torch.float32).reshape(m, n)
        if w.numel():
            bad = int((~torch.isfinite(w)).sum())
            if bad:
                raise CodecError(
                    f"tensor {spec.name!r} has {bad} NaN/Inf values; rtn cannot store them, use 'lossless' or 'raw'"
                )
            peak = float(w.abs().max())
            if peak > F16_MAX:
                raise CodecError(
                    f"tensor {spec.name!r} has |w| up to {peak:g}, beyond the F16 range of rtn's scale/offset; "
                    "use 'lossless' or 'raw'"
                )
        q, scale, offset = quantize(w, self.bits, self.group_size, hqq=self.hqq, hqq_iters=self.hqq_iters,
                                    clip_search=self.clip_search,
                                    importance=ctx.importance if self.clip_search and ctx is not None else None)
        gram = ctx.extras.get("input_gram") if self.gptq else None
        if gram is not None and len(spec.shape) == 2 and w.numel():
            q = self._gptq_codes(w, scale, offset, gram, spec.name)
        fields = {
            "codes": pack_bits(q, self.bits),  # [ceil(m*n/8)*bits] uint8
            "scale": scale.contiguous(),  # [m, G] f16
            "offset": offset.contiguous(),  # [m, G] f16
        }
        return Encoded(fields, {"bits": self.bits, "group_size": self.group_size})

    def _gptq_codes(self, w: Tensor, scale16: Tensor, offset16: Tensor, gram: Tensor, name: str) -> Tensor:
        """Codes [m, n] uint8 chosen by GPTQ on the fixed (static) group grid."""
        from .gptq import grid_codes

        grid = torch.arange(1 << self.bits, dtype=torch.float32)  # code k means offset + k * scale
        codes, _ = grid_codes(w, gram, scale16, offset16, self.group_size, grid, self._gptq_config, name=name)
        return codes.to(torch.uint8)

    # ---- healing: the codes straight-through ----------------------------------------------------
    @classmethod
    def ste_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """``codes``: the per-weight codes, trained straight-through when healing asks (``--ste``):
        rounded and clamped to ``0 .. 2**bits - 1`` in the forward pass, gradient passed unchanged
        (EfficientQAT's block-wise training of the weights on a fixed grid, here in code units)."""
        return ("codes",)

    @classmethod
    def ste_values(cls, name: str, fields: Mapping[str, Tensor], spec: TensorSpec,
                   params: Mapping[str, Any]) -> Tensor:
        if name != "codes":
            return super().ste_values(name, fields, spec, params)
        m, n = _matrix_shape(tuple(spec.shape))
        return unpack_codes(fields["codes"], params["bits"], m * n).view(m, n).to(torch.float32)

    @classmethod
    def ste_start(cls, name: str, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                  dense: Tensor | None = None) -> Tensor:
        """The stored code plus the dense weight's rounding remainder ``(w - offset) / scale - code``
        where the stored code is the dense weight's rounding (the remainder is within half a step),
        the stored code itself elsewhere: a code GPTQ (or clipping) moved away from the dense
        weight's rounding starts in the middle of its step, not on the edge where any gradient
        would flip it back."""
        q = cls.ste_values(name, fields, spec, params)
        if name != "codes" or dense is None:
            return q
        m, n = q.shape
        g = params["group_size"]
        sc = expand_groups(fields["scale"].float(), g, n)
        unit = (dense.detach().float().reshape(m, n) - expand_groups(fields["offset"].float(), g, n)) / sc.where(
            sc != 0, torch.ones_like(sc))
        rem = unit - q
        keep = (rem.abs() <= 0.5) & (sc != 0)
        return q + rem.clamp(-0.49, 0.49).where(keep, torch.zeros_like(q))

    @classmethod
    def ste_pack(cls, name: str, values: Tensor, spec: TensorSpec, params: Mapping[str, Any]) -> Tensor:
        if name != "codes":
            return super().ste_pack(name, values, spec, params)
        qmax = (1 << params["bits"]) - 1
        return pack_bits(values.detach().round().clamp(0, qmax).to(torch.uint8).reshape(-1), params["bits"])

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        """``offset + scale * q`` per group, differentiable in scale and offset; ``codes`` given as
        float code values (``ste_values``) are rounded and clamped forward and passed straight through
        backward. With packed codes it is the mixin's (codes fixed, unpacked once)."""
        codes = fields["codes"]
        if not codes.is_floating_point():
            return super().decode_train(fields, spec, params, shared, memo)
        q = codes + (codes.detach().round().clamp(0, (1 << params["bits"]) - 1) - codes.detach())
        return affine_groups(fields, q, spec, params)

    # ---- decoding -----------------------------------------------------------------------------
    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("bits", "group_size"))
        bits = check_param(cls.name, spec.name, params, "bits", int, MIN_BITS, MAX_BITS)
        g = check_param(cls.name, spec.name, params, "group_size", int, 1, MAX_GROUP)
        m, n = _matrix_shape(tuple(spec.shape))
        groups = -(-n // g)
        return {
            "codes": FieldSpec(torch.uint8, (packed_nbytes(m * n, bits),)),
            "scale": FieldSpec(torch.float16, (m, groups)),
            "offset": FieldSpec(torch.float16, (m, groups)),
        }

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype, *, fast: bool | None = None) -> Tensor:
        """``fast``: the Triton kernel (``kernels/rtn.py``) on CUDA when Triton imports, and on the
        CPU the numba pass (``_rtn_kernels.py``) at every width; ``False`` keeps
        this pure-PyTorch reference."""
        f = cls.checked_fields(enc, spec, device)
        compiled_cpu = fast is None  # the numba pass below, when the payload is on the CPU
        if fast is None:
            fast = torch.device(device).type == "cuda" and dtype in _KERNEL_DTYPES and kernels_available(device)
        if fast:
            from .kernels.rtn import decode as kernel_decode

            return kernel_decode(Encoded(f, enc.params), spec, dtype)
        codes, scale, offset = f["codes"], f["scale"], f["offset"]
        bits, g = enc.params["bits"], enc.params["group_size"]
        m, n = _matrix_shape(tuple(spec.shape))
        if compiled_cpu and codes.device.type == "cpu":
            kernel = _cpu_kernel()
            if kernel is not None:  # one compiled pass (_rtn_kernels.py), equal to the code below
                out = torch.empty((m, n), dtype=torch.float32)
                kernel.decode(codes.contiguous().numpy(), scale.to(torch.float32).contiguous().numpy(),
                              offset.to(torch.float32).contiguous().numpy(), bits, g, out.numpy())
                return out.to(dtype).view(spec.shape)
        q = unpack_codes(codes, bits, m * n).view(m, n)
        sc = scale.to(torch.float32)
        of = offset.to(torch.float32)
        out = torch.empty((m, n), dtype=dtype, device=codes.device)
        full = n // g  # complete groups per row
        if full:
            na = full * g
            # One fused pass: computed in float32 (uint8 * f32 + f32), cast on store to `dtype`.
            torch.addcmul(of[:, :full, None], q[:, :na].view(m, full, g), sc[:, :full, None],
                          out=out[:, :na].view(m, full, g))
        if n % g:
            torch.addcmul(of[:, full:], q[:, full * g:], sc[:, full:], out=out[:, full * g:])
        return out.view(spec.shape)


    @classmethod
    def decode_rows(cls, enc: Encoded, spec: TensorSpec, shared: SharedState, ids: Tensor,
                    device: torch.device, dtype: torch.dtype) -> Tensor:
        """Rows ``ids`` (int, any shape ``S``) of the decoded 2-D tensor, shape ``S + [n]``, reading
        only their codes (an embedding lookup that never decodes the table). Equal to
        ``decode(...)[ids]`` (tested)."""
        flat = row_ids(cls.name, spec, ids, device)
        m, n = spec.shape
        f = cls.checked_fields(enc, spec, device)
        bits, g = enc.params["bits"], enc.params["group_size"]
        codes = f["codes"]
        col = torch.arange(n, device=codes.device)
        if bits == 8:
            q = codes[flat[:, None] * n + col]
        else:  # code i of the flat array starts at bit i*bits (8 codes fill `bits` whole bytes)
            start = (flat[:, None] * n + col) * bits  # [U, n] bit offsets
            lo, hi = codes[start >> 3].to(torch.int32), codes[(start + bits - 1) >> 3].to(torch.int32)
            q = ((lo | (hi << 8)) >> (start & 7)) & ((1 << bits) - 1)
        grp = col // g
        sc = f["scale"][flat][:, grp].to(torch.float32)
        of = f["offset"][flat][:, grp].to(torch.float32)
        return torch.addcmul(of, q.to(torch.float32), sc).to(dtype).view(*ids.shape, n)

def grouped_affine_train(decode, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                         shared: SharedState, memo: dict[str, Tensor] | None) -> Tensor:
    """``offset + scale * unit`` per group of ``params["group_size"]`` weights along each row, where
    ``unit`` is the codec's own ``decode`` at scale 1 and offset 0 (its fixed codes through their
    tables), computed once and kept in ``memo``; differentiable in ``scale`` and ``offset``. The
    ``decode_train`` of every codec stored as ``q * scale + offset`` per group (rtn, hyperc)."""
    train_dtype(fields, ("scale", "offset"))  # fails on stored f16 fields before any decoding
    m, n = _matrix_shape(tuple(spec.shape))
    unit = memo.get("unit") if memo is not None else None
    if unit is None:
        unit = decode(Encoded(stored_at_unit(fields, ("scale",), ("offset",)), dict(params)), spec, shared,
                      fields["scale"].device, torch.float32, fast=False).reshape(m, n)
        if memo is not None:
            memo["unit"] = unit
    return affine_groups(fields, unit, spec, params)


def affine_groups(fields: Mapping[str, Tensor], unit: Tensor, spec: TensorSpec, params: Mapping[str, Any]) -> Tensor:
    """``offset + scale * unit`` per group of ``params["group_size"]`` along each row of ``unit`` [m, n],
    in the trainable fields' dtype, shaped as ``spec``: the weight of every grouped affine payload."""
    dt = train_dtype(fields, ("scale", "offset"))
    g, n = params["group_size"], unit.shape[1]
    w = expand_groups(fields["offset"], g, n) + unit.to(dt) * expand_groups(fields["scale"], g, n)
    return w.reshape(spec.shape)


def expand_groups(x: Tensor, group_size: int, n: int) -> Tensor:
    """Per-group values ``[m, G]`` -> per-weight ``[m, n]`` (group ``j // group_size``), differentiable."""
    return x.repeat_interleave(group_size, dim=1)[:, :n]


# ---- unpacking --------------------------------------------------------------------------------
_SHIFT_CACHE: dict[tuple[int, str], tuple[Tensor, ...]] = {}


def _tables(bits: int, device: torch.device) -> tuple[Tensor, ...]:
    key = (bits, str(device))
    t = _SHIFT_CACHE.get(key)
    if t is None:
        if 8 % bits == 0:
            t = (torch.arange(0, 8, bits, dtype=torch.uint8, device=device),)
        else:
            start = torch.arange(8) * bits
            lo = start // 8
            hi = (start + bits - 1) // 8
            t = (lo.to(device), hi.to(device), (start % 8).to(torch.int16).to(device))
        _SHIFT_CACHE[key] = t
    return t


@functools.lru_cache(maxsize=1)
def _cpu_kernel():
    """The compiled CPU decoder (``codecs/_rtn_kernels.py``), or None without numba (then the
    PyTorch path below runs; rans_numba logs numba's absence once)."""
    try:
        from . import _rtn_kernels
    except Exception:  # noqa: BLE001 - ImportError, or numba failing to initialise here
        return None
    return _rtn_kernels


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """Fast ``bitpack.unpack_bits``: packed [packed_nbytes(count, bits)] uint8 -> codes [count] uint8.

    Bit-exact with ``unpack_bits`` (tested): widths dividing 8 are split with uint8 shifts; the
    others read each code from the (at most two) bytes it spans as one int16.
    """
    need = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        return unpack_bits(packed, bits, count)  # raises the descriptive error
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    tabs = _tables(bits, packed.device)
    if 8 % bits == 0:
        codes = (packed.unsqueeze(1) >> tabs[0]).bitwise_and_(mask)  # [bytes, 8/bits]
        return codes.view(-1)[:count]
    lo, hi, shift = tabs
    by = packed.view(-1, bits)  # [groups, bits]: 8 codes per `bits` bytes
    pair = by[:, lo].to(torch.int16).bitwise_or_(by[:, hi].to(torch.int16) << 8)  # [groups, 8]
    return pair.bitwise_right_shift_(shift).bitwise_and_(mask).to(torch.uint8).view(-1)[:count]


# ---- quantisation (encode side) ---------------------------------------------------------------
def _f16_down(x: Tensor) -> Tensor:
    """float32 -> float16, rounded toward -inf."""
    h = x.to(torch.float16)
    return torch.where(h.to(torch.float32) > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _f16_up(x: Tensor) -> Tensor:
    """float32 -> float16, rounded toward +inf."""
    h = x.to(torch.float16)
    return torch.where(h.to(torch.float32) < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def _codes(wg: Tensor, scale: Tensor, offset: Tensor, qmax: int) -> Tensor:
    """float32 codes of grouped weights [m, G, g] for float32 scale/offset [m, G]."""
    return ((wg - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).round_().clamp_(0, qmax)


def _group_sq_err(wg: Tensor, q: Tensor, scale: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
    err = torch.addcmul(offset.unsqueeze(-1), q, scale.unsqueeze(-1)).sub_(wg).square_()
    if mask is not None:
        err.mul_(mask)
    return err.sum(-1)


def quantize(w: Tensor, bits: int, group_size: int, *, hqq: bool = False, hqq_iters: int = 20,
             clip_search: bool = False, importance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise a finite float32 matrix [m, n] -> codes [m, n] uint8, scale and offset [m, G] f16.
    ``clip_search``: each group's range is the shrink of [min, max] with the lowest squared error, weighted
    per column by ``importance`` [n] when given (``_clip_search``)."""
    m, n = w.shape
    g = group_size
    groups = -(-n // g)
    qmax = (1 << bits) - 1
    if m * n == 0:
        empty = torch.zeros((m, groups), dtype=torch.float16)
        return torch.zeros((m, n), dtype=torch.uint8), empty, empty.clone()
    pad = groups * g - n
    mask: Tensor | None = None
    if pad:  # edge padding keeps every group's min/max; the mask keeps it out of means and errors
        w = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1)
        mask = torch.ones(groups * g)
        mask[n:] = 0
        mask = mask.view(1, groups, g)
    wg = w.view(m, groups, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    offset16, scale16 = _clip_search(wg, lo, hi, mask, qmax, importance, n) if clip_search else _grid(lo, hi, qmax)
    scale = scale16.float()
    q = _codes(wg, scale, offset16.float(), qmax)
    if hqq and hqq_iters > 0:
        q, offset16 = _hqq_refine(wg, q, scale, offset16, mask, qmax, hqq_iters)
    q = q.to(torch.uint8).view(m, groups * g)[:, :n]
    return q, scale16, offset16


def _grid(lo: Tensor, hi: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """F16 offset and scale of a grid covering [lo, hi]: offset rounded down, scale up."""
    offset16 = _f16_down(lo)
    scale16 = _f16_up((hi - offset16.float()) / qmax)
    return offset16, torch.where(scale16 > 0, scale16, torch.ones_like(scale16))  # zero-range guard


# shrink factors of a group's [min, max] tried by ``clip_search=true`` (GPTQ's ``mse`` grid search, coarser)
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(17))  # 1.0 .. 0.6


def _clip_search(wg: Tensor, lo: Tensor, hi: Tensor, mask: Tensor | None, qmax: int,
                 importance: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """Per group, the grid over ``[a * min, a * max]`` (``a`` in ``CLIP_GRID``, 1 included, so never
    worse than min/max) with the lowest squared rounding error, each column's error weighted by its
    ``importance`` (the input's E[x^2]: the error the layer's output sees); returns offset, scale F16."""
    m, groups, g = wg.shape
    weight = None
    if importance is not None:
        imp = importance.detach().to("cpu", torch.float32).reshape(-1)
        if imp.numel() != n:
            raise CodecError(f"rtn clip: importance has {imp.numel()} values for {n} columns")
        weight = torch.cat([imp, imp.new_zeros(groups * g - n)]).view(1, groups, g)
    if mask is not None:
        weight = mask if weight is None else weight * mask
    best = best_off = best_sc = None
    for a in CLIP_GRID:  # the first, 1.0, is the plain min/max grid
        off16, sc16 = _grid(lo * a, hi * a, qmax)
        sc, off = sc16.float(), off16.float()
        err = _group_sq_err(wg, _codes(wg, sc, off, qmax), sc, off, weight)
        if best is None:
            best, best_off, best_sc = err, off16, sc16
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_off = torch.where(better, off16, best_off)
        best_sc = torch.where(better, sc16, best_sc)
    return best_off, best_sc


def _hqq_refine(wg: Tensor, q: Tensor, scale: Tensor, offset16: Tensor, mask: Tensor | None,
                qmax: int, iters: int) -> tuple[Tensor, Tensor]:
    """HQQ's proximal solver for the offset (scale fixed); keeps each group's best F16 iterate."""
    count = float(wg.shape[0] * (mask.sum() if mask is not None else wg.shape[1] * wg.shape[2]))
    per_group = mask.sum(-1) if mask is not None else float(wg.shape[-1])
    best_err = _group_sq_err(wg, q, scale, offset16.float(), mask)
    best_q, best_off = q, offset16
    offset = offset16.float()
    beta, best_l1 = HQQ_BETA, math.inf
    sc = scale.unsqueeze(-1)
    for it in range(iters):
        qi = _codes(wg, scale, offset, qmax)
        resid = wg - torch.addcmul(offset.unsqueeze(-1), qi, sc)  # W - W_r
        l1 = resid.abs()
        if mask is not None:
            l1.mul_(mask)
        l1 = float(l1.sum()) / count
        if l1 >= best_l1:  # HQQ's stopping rule: the error rose
            log.debug("hqq stopped after %d iterations (mean |err| %.3g)", it, l1)
            break
        best_l1 = l1
        # W_e = shrink_p(W - W_r), p = 0.7; then the offset is the group mean of W - W_e - q * s.
        a = resid.abs()
        shrunk = torch.sign(resid) * torch.relu(a - (a + 1e-8).pow(HQQ_P - 1.0) / beta)
        target = wg - shrunk - qi * sc
        if mask is not None:
            target.mul_(mask)
        offset = target.sum(-1) / per_group
        beta *= HQQ_KAPPA
        # Candidate with the offset as it will be stored (F16) and codes recomputed from it.
        cand_off = offset.clamp(-F16_MAX, F16_MAX).to(torch.float16)
        cand_q = _codes(wg, scale, cand_off.float(), qmax)
        err = _group_sq_err(wg, cand_q, scale, cand_off.float(), mask)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_off = torch.where(better, cand_off, best_off)
        best_q = torch.where(better.unsqueeze(-1), cand_q, best_q)
    return best_q, best_off


def rtn_decode_reference(codes: Tensor, scale: Tensor, offset: Tensor, bits: int, group_size: int,
                         shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Straightforward decode (``unpack_bits``, pad to whole groups, ``q*scale+offset``) for tests."""
    m, n = _matrix_shape(tuple(shape))
    groups = -(-n // group_size)
    q = unpack_bits(codes, bits, m * n).view(m, n).to(torch.float32)
    qp = torch.zeros(m, groups * group_size)
    qp[:, :n] = q
    w = qp.view(m, groups, group_size) * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return w.view(m, groups * group_size)[:, :n].to(dtype).reshape(shape)
