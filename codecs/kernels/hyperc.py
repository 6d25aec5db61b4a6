"""Triton kernels for ``hyperc``: the decode of every configuration, and a fused small-batch
decode-matmul for the 1-D (scalar) codebook.

Decode (``decode``): one program writes a tile of ``BR`` rows x ``BV`` vectors x ``DP`` coordinates
(``DP`` = ``dim`` rounded up to a power of two, the extra lane masked) of the ``[m, n]`` view.
Per vector it reads its index from the LSB-first bit streams (1-2 byte loads per stream; row
math in int64 only when a stream or the output passes 2**31), per coordinate it computes the
closed form ``((k * z_j) mod K) / K`` (int32 when the product fits, ``& (K-1)`` for a
power-of-two ``K``, exact ``div_rn`` otherwise; int->float by the ``0x4B000000`` trick), then
``x * scale + offset`` in fp32 and one rounding to the output dtype. No table, no gather beyond
the group's scale/offset (per row when the tile lies inside one group, per vector otherwise).
The 1-D codebook with 1/2/4-bit indices (``K = 2**B``, rows of whole bytes) has its own kernel:
one wide load per 16 bytes of codes, the codes of a byte split by constant shifts, 128-bit
stores (sm_90 SASS: 12 instructions per weight; the general kernel 20-30). ``dim``, the bit
widths, ``K``, ``z`` and ``group_size`` are compile-time constants: a model has a handful of
distinct configurations.

Fused matmul (``prepare`` / ``matmul``), ``dim == 1``, ``index_bits <= 8``, ``group_size % 8 == 0``:
the codes are repacked once into bit planes of width 8/4/2/1 (``B = 3`` is 2+1, ``5`` is 4+1, ...),
each a row-major ``[out, in/8]`` array of 8-code slots (int32 for 4 bits, int16 for 2, uint8 for 1;
the 8-bit plane is ``[out, in8]`` uint8), so the resident weight is exactly ``index_bits`` bits per
weight plus the F16 scale/offset (the stored payload's size; columns padded to a multiple of 8).
A program owns ``BN`` output rows and a split of the input, ``BKW`` slots (8 columns each, always
inside one group) per step; the codes become floats by the ``0x4B000000`` trick (no I2F) and
``w = k * scale/K + offset`` in fp32. One row (any dtype): ``w * x`` is accumulated per lane into
a ``[BN, BKW, 8]`` tile, reduced once at the end (no shuffles in the loop). Rows 2..16 of bf16/fp16
x: the tile is rounded to x's dtype and multiplied by ``tl.dot`` (x padded to 16 rows), so the
result is ``F.linear(x, decode(W, x.dtype))`` up to accumulation order; fp32 x with 2..16 rows
reduces per row in fp32. Split-K partials ``[splits, M, N]`` fp32 are summed by torch.
Other configurations (and rows > 16) decode into a temporary and call ``F.linear``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from thawed.codecs.base import Encoded, TensorSpec
from thawed.codecs.errors import CodecError, CorruptPayloadError
from thawed.codecs.kernels import interpreting

__all__ = ["decode", "prepare", "matmul", "HypercFusedWeight", "fused_unsupported_reason"]

log = logging.getLogger(__name__)

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DECODE_TILE = 4096  # output elements per decode program (with 4 warps: 32 per thread)
MAX_FUSED_ROWS = 16
# Programs a fused matmul aims for (column blocks x split-K), by rows of x. H200 (132 SMs), measured
# by gpu_bench.py's sweep on 4096 x 11008 (docs/GPU.md): one row 44.2 us at 4224 against 48.2 us at
# 528 (132: 79.1, 2112: 45.7). The column block width follows _TARGET_PROGRAMS whatever the target.
_TARGET_PROGRAMS = 132 * 4  # 2..16 rows
_TARGET_PROGRAMS_GEMV = 132 * 32  # 1 row
FORCE_INT64 = False  # tests: run the 64-bit row math of huge tensors on small ones


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    from thawed.codecs.rtn import _matrix_shape as ms

    return ms(tuple(shape))


# ---- decode ------------------------------------------------------------------------------------
@triton.jit
def _read_codes(ptr, nbytes, row_bit, v, mask, B: tl.constexpr):
    """Codes ``v`` ([1, BV] int32) of a LSB-first ``B``-bit stream whose rows start at bit
    ``row_bit`` ([BR] int64) -> int32 [BR, BV]. 64-bit math per row, 32-bit per code."""
    rowp = (ptr + (row_bit >> 3))[:, None]  # [BR, 1] pointers to each row's first byte
    lb = (row_bit & 7).to(tl.int32)[:, None] + v * B  # bit offset from that byte
    off = lb >> 3
    b0 = tl.load(rowp + off, mask=mask, other=0).to(tl.int32)
    if B == 8:
        k = b0
    elif 8 % B == 0:
        k = (b0 >> (lb & 7)) & ((1 << B) - 1)
    else:  # the code may straddle two bytes
        last = (nbytes - 1 - (row_bit >> 3)).to(tl.int32)[:, None]  # the stream's last byte, row-relative
        b1 = tl.load(rowp + off + 1, mask=mask & (off < last), other=0).to(tl.int32)
        k = ((b0 | (b1 << 8)) >> (lb & 7)) & ((1 << B) - 1)
    return k


@triton.jit
def _decode_kernel(lo_ptr, hi_ptr, scale_ptr, offset_ptr, out_ptr, flag_ptr,
                   m, n, V, G, lo_nbytes, hi_nbytes,
                   DIM: tl.constexpr, DP: tl.constexpr, BL: tl.constexpr, BH: tl.constexpr,
                   K: tl.constexpr, Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr,
                   GV: tl.constexpr, POW2: tl.constexpr, WIDE: tl.constexpr, CHECK: tl.constexpr,
                   ALIGNED: tl.constexpr, BIG: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    # codes_lo: [packed(m*V, BL)] uint8; codes_hi: [packed(m*V, BH)] uint8 (BH = 0: absent)
    # scale, offset: [m, G] f16; out: [m, n]; GV = group_size // dim vectors per group
    pid = tl.program_id(0)
    nvb = tl.cdiv(V, BV)
    pr = pid // nvb
    pv = pid - pr * nvb
    r = pr * BR + tl.arange(0, BR)
    v = pv * BV + tl.arange(0, BV)
    rmask = r < m
    if BIG:  # offsets past 2**31 (bits of a stream, or output elements): 64-bit row math
        r64 = r.to(tl.int64)
    else:
        r64 = r
    mask2 = rmask[:, None] & (v < V)[None, :]
    vi = r64 * V  # [BR] index of the row's first vector
    k = _read_codes(lo_ptr, lo_nbytes, vi * BL, v[None, :], mask2, BL)
    if BH > 0:
        k = k | (_read_codes(hi_ptr, hi_nbytes, vi * BH, v[None, :], mask2, BH) << 8)
    if CHECK:  # an index beyond the codebook: the payload is corrupt (the host reads the flag)
        bad = tl.max(tl.max(tl.where(mask2 & (k >= K), 1, 0), axis=1), axis=0)
        tl.atomic_max(flag_ptr, bad)
    j = tl.arange(0, DP)[None, None, :]
    z = tl.where(j == 0, 1, tl.where(j == 1, Z1, tl.where(j == 2, Z2, Z3)))
    k3 = k[:, :, None]
    if POW2:
        if DIM == 1:
            c = k3 & (K - 1)
        else:
            c = (k3 * z) & (K - 1)  # int32 wrap-around keeps the low bits
    elif WIDE:
        c = ((k3.to(tl.int64) * z) % K).to(tl.int32)
    else:
        c = (k3 * z) % K
    cf = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact float of c < 2**23
    if POW2:
        x = cf * (1.0 / K)  # exact: K is a power of two
    else:
        x = tl.math.div_rn(cf, tl.full(cf.shape, K, tl.float32))  # correctly rounded, as torch
    if ALIGNED:  # the tile lies inside one group: one scale/offset per row
        gi = (pv * BV) // GV
        sc = tl.load(scale_ptr + r64 * G + gi, mask=rmask, other=0.0).to(tl.float32)[:, None, None]
        of = tl.load(offset_ptr + r64 * G + gi, mask=rmask, other=0.0).to(tl.float32)[:, None, None]
    else:
        gi = (v // GV)[None, :]
        sc = tl.load(scale_ptr + r64[:, None] * G + gi, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
        of = tl.load(offset_ptr + r64[:, None] * G + gi, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    y = x * sc + of
    if DIM == DP:  # whole vectors fill the tile's columns: store it as a contiguous 2-D block
        val = tl.reshape(y.to(out_ptr.dtype.element_ty), (BR, BV * DP))  # column v*DIM + j
        col2 = pv * BV * DIM + tl.arange(0, BV * DP)[None, :]
        tl.store((out_ptr + r64 * n)[:, None] + col2, val, mask=rmask[:, None] & (col2 < n))
    else:
        col = v[None, :, None] * DIM + j
        emask = rmask[:, None, None] & (j < DIM) & (col < n)
        orow = (out_ptr + r64 * n)[:, None, None]  # [BR, 1, 1] row pointers: 32-bit offsets per element
        tl.store(orow + col, y.to(out_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _decode_bytes_kernel(lo_ptr, scale_ptr, offset_ptr, out_ptr, m, n, RB, G,
                         B: tl.constexpr, CPB: tl.constexpr, GROUP: tl.constexpr, ALIGNED: tl.constexpr,
                         BIG: tl.constexpr, BR: tl.constexpr, BY: tl.constexpr):
    # The 1-D codebook with K = 2**B, B in {1, 2, 4}, rows of whole bytes: one load per byte of
    # codes_lo [m, RB] uint8 (RB = n*B/8), its CPB = 8/B codes split by constant shifts.
    pid = tl.program_id(0)
    nyb = tl.cdiv(RB, BY)
    pr = pid // nyb
    py = pid - pr * nyb
    r = pr * BR + tl.arange(0, BR)
    y = py * BY + tl.arange(0, BY)
    rmask = r < m
    if BIG:
        rr = r.to(tl.int64)
    else:
        rr = r
    mask2 = rmask[:, None] & (y < RB)[None, :]
    byte = tl.load((lo_ptr + rr * RB)[:, None] + y[None, :], mask=mask2, other=0).to(tl.int32)
    t = tl.arange(0, CPB)[None, None, :]
    k = (byte[:, :, None] >> (t * B)) & ((1 << B) - 1)
    x = ((k | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * (1.0 / (1 << B))
    if ALIGNED:  # the tile lies inside one group
        gi = (py * BY * CPB) // GROUP
        sc = tl.load(scale_ptr + rr * G + gi, mask=rmask, other=0.0).to(tl.float32)[:, None, None]
        of = tl.load(offset_ptr + rr * G + gi, mask=rmask, other=0.0).to(tl.float32)[:, None, None]
    else:  # GROUP % CPB == 0: a byte's codes share a group
        gi = ((y * CPB) // GROUP)[None, :]
        sc = tl.load(scale_ptr + rr[:, None] * G + gi, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
        of = tl.load(offset_ptr + rr[:, None] * G + gi, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    val = tl.reshape((x * sc + of).to(out_ptr.dtype.element_ty), (BR, BY * CPB))  # column y*CPB + t
    col = py * BY * CPB + tl.arange(0, BY * CPB)[None, :]
    tl.store((out_ptr + rr * n)[:, None] + col, val, mask=rmask[:, None] & (col < n))


def _byte_tiles(n: int, B: int, g: int) -> tuple[int, int, bool]:
    """(BR, BY, aligned) of ``_decode_bytes_kernel`` for rows of ``n`` weights, groups of ``g``."""
    cpb = 8 // B
    p2 = g & -g
    if n > g and p2 >= 16:
        cols, aligned = min(p2, 512), True
    else:
        cols, aligned = min(_pow2(n), 512), n <= g
    by = max(1, cols // cpb)
    return max(1, DECODE_TILE // (by * cpb)), by, aligned


def _decode_tiles(V: int, dim: int, g: int) -> tuple[int, int, int, bool]:
    """(DP, BR, BV, aligned) for rows of ``V`` vectors of ``dim`` and groups of ``g`` weights."""
    dp = _pow2(dim)
    gv = g // dim
    p2 = gv & -gv  # largest power of two dividing the group's vector count
    cap = max(1, 512 // dp)
    if V > gv and p2 >= 16 and dp == dim:  # (dim 3: wider rows beat per-row scales, by SASS count)
        bv, aligned = min(p2, cap), True
    else:
        bv = min(_pow2(V), cap)
        aligned = V <= gv  # the whole row is one group
    br = max(1, DECODE_TILE // (bv * dp))
    return dp, br, bv, aligned


def decode(enc: Encoded, spec: TensorSpec, dtype: torch.dtype, out: Tensor | None = None,
           shared=None) -> Tensor:
    """``HyperC.decode`` on the payload's device by one Triton kernel (closed-form coordinates).

    Equal to the reference in fp32 up to FMA contraction (bit-equal where there is none) and
    within one rounding in bf16/fp16. ``out``: a contiguous ``spec.shape`` tensor of ``dtype`` on the
    device to write into (returned). CUDA-graph capturable; an index beyond ``points`` (only
    possible when ``points < 2**index_bits``) raises ``CorruptPayloadError`` outside capture.
    """
    from thawed.codecs.hyperc import HyperC

    if dtype not in OUT_DTYPES:
        raise CodecError(f"tensor {spec.name!r}: hyperc kernel decodes to {OUT_DTYPES}, not {dtype}")
    device = enc.fields["codes_lo"].device
    f = HyperC.checked_fields(enc, spec, device)
    p = enc.params
    dim, B, K, z, g = p["dim"], p["index_bits"], p["points"], list(p["generator"]), p["group_size"]
    m, n = _matrix_shape(tuple(spec.shape))
    V = -(-n // dim)
    G = -(-n // g)
    if out is None:
        out = torch.empty(spec.shape, dtype=dtype, device=device)
    elif tuple(out.shape) != tuple(spec.shape) or out.dtype != dtype or not out.is_contiguous() \
            or out.device != device:
        raise CodecError(f"tensor {spec.name!r}: out must be a contiguous {dtype} {list(spec.shape)} tensor on "
                         f"{device}, got {out.dtype} {list(out.shape)} on {out.device}")
    if m * n == 0:
        return out
    bl, bh = min(B, 8), max(B - 8, 0)
    lo = f["codes_lo"]
    hi = f.get("codes_hi", lo)
    pow2 = K & (K - 1) == 0
    check = K < (1 << B)
    flag = torch.zeros(1, dtype=torch.int32, device=device) if check else lo
    big = FORCE_INT64 or max(lo.numel(), hi.numel(), m * (n + 8 * dim)) * 8 >= 2**31
    if dim == 1 and B in (1, 2, 4) and K == 1 << B and (n * B) % 8 == 0 and g % (8 // B) == 0:
        br, by, aligned = _byte_tiles(n, B, g)
        rb = n * B // 8
        _decode_bytes_kernel[(triton.cdiv(m, br) * triton.cdiv(rb, by),)](
            lo, f["scale"], f["offset"], out, m, n, rb, G, B=B, CPB=8 // B, GROUP=g, ALIGNED=aligned, BIG=big,
            BR=br, BY=by, num_warps=4)
        return out
    dp, br, bv, aligned = _decode_tiles(V, dim, g)
    zz = z + [0] * (4 - dim)
    grid = (triton.cdiv(m, br) * triton.cdiv(V, bv),)
    _decode_kernel[grid](
        lo, hi, f["scale"], f["offset"], out, flag, m, n, V, G, lo.numel(), hi.numel(),
        DIM=dim, DP=dp, BL=bl, BH=bh, K=K, Z1=zz[1], Z2=zz[2], Z3=zz[3], GV=g // dim, POW2=pow2,
        WIDE=((1 << B) - 1) * (K - 1) >= 2**31, CHECK=check, ALIGNED=aligned,
        BIG=big, BR=br, BV=bv, num_warps=4)
    if check and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if int(flag.item()):
            raise CorruptPayloadError(f"tensor {spec.name!r}: codec 'hyperc' has an index beyond points={K}; "
                                      "the file is damaged or was not written by thawed")
    return out


# ---- fused small-batch matmul (1-D codebook) ----------------------------------------------------
def _plane_widths(B: int) -> tuple[int, ...]:
    """``B`` bits (1..8) as planes of 8/4/2/1 bits, widest first (B=7 -> 4, 2, 1)."""
    if B == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if B & w)


_PLANE_DTYPE = {8: torch.uint8, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclass(frozen=True)
class HypercFusedWeight:
    """A hyperc weight ready for ``matmul``.

    Fused (``planes`` non-empty, ``dim == 1``): ``planes[p]`` holds bits ``shift_p .. shift_p +
    widths[p]`` of every index: width 8 -> ``[out, in8]`` uint8, 4 -> ``[out, in8/8]`` int32,
    2 -> ``[out, in8/8]`` int16, 1 -> ``[out, in8/8]`` uint8 (``in8`` = in rounded up to 8; slot ``s``
    holds the codes of columns ``8s .. 8s+7``, column ``8s+j`` at bits ``j*width``);
    ``scale``, ``offset``: ``[out, G]`` float16 as stored. Otherwise ``payload``/``spec`` are the
    stored payload, decoded per call (``reason`` says why).
    """

    out_features: int
    in_features: int
    group_size: int
    points: int
    widths: tuple[int, ...]
    planes: tuple[Tensor, ...]
    scale: Tensor | None
    offset: Tensor | None
    payload: Encoded | None = None
    spec: TensorSpec | None = None
    reason: str | None = None

    @property
    def nbytes(self) -> int:
        """Resident bytes (codes and side information)."""
        if self.payload is not None:
            return self.payload.nbytes
        return sum(t.numel() * t.element_size() for t in (*self.planes, self.scale, self.offset))

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / max(1, self.out_features * self.in_features)


def fused_unsupported_reason(params: dict, shape: tuple[int, ...]) -> str | None:
    """None when ``prepare`` builds the fused form for these params and shape, else why not."""
    if len(shape) != 2:
        return "not a matrix"
    if params["dim"] != 1:
        return f"dim={params['dim']} (the fused kernel covers the 1-D codebook)"
    if params["index_bits"] > 8:
        return f"index_bits={params['index_bits']} (the fused kernel takes at most 8)"
    if params["group_size"] % 8:
        return f"group_size={params['group_size']} is not a multiple of 8"
    return None


def prepare(enc: Encoded, spec: TensorSpec) -> HypercFusedWeight:
    """Repack a payload (fields on the target device) once for ``matmul``; validates every index
    (a host sync: call at load, not per token)."""
    from thawed.codecs.hyperc import HyperC, _unpack_index

    p = enc.params
    device = enc.fields["codes_lo"].device
    f = HyperC.checked_fields(enc, spec, device)
    m, n = _matrix_shape(tuple(spec.shape))
    why = fused_unsupported_reason(p, tuple(spec.shape))
    if why is not None:
        log.debug("%s: hyperc matmul decodes per call: %s", spec.name, why)
        return HypercFusedWeight(m, n, p["group_size"], p["points"], (), (), None, None,
                                 Encoded(f, p), spec, why)
    B, K = p["index_bits"], p["points"]
    k = _unpack_index(f, B, m * n).to(torch.int32)  # [m*n]: dim 1, so one index per weight
    if m * n and int(k.max()) >= K:
        raise CorruptPayloadError(f"tensor {spec.name!r}: codec 'hyperc' index {int(k.max())} is beyond "
                                  f"points={K}; the file is damaged or was not written by thawed")
    n8 = -(-n // 8) * 8
    kk = torch.zeros((m, n8), dtype=torch.int32, device=device)
    kk[:, :n] = k.view(m, n)
    planes, shift = [], 0
    widths = _plane_widths(B)
    for w in widths:
        part = (kk >> shift) & ((1 << w) - 1)
        shift += w
        if w == 8:
            planes.append(part.to(torch.uint8).contiguous())  # [m, n8] uint8
            continue
        slots = part.view(m, n8 // 8, 8).to(torch.int64)
        word = (slots << (torch.arange(8, device=device, dtype=torch.int64) * w)).sum(-1)  # [m, n8/8]
        if w == 4:  # int32: reinterpret the unsigned 32-bit value
            word = torch.where(word >= 2**31, word - 2**32, word)
        elif w == 2:
            word = torch.where(word >= 2**15, word - 2**16, word)
        planes.append(word.to(_PLANE_DTYPE[w]).contiguous())
    return HypercFusedWeight(m, n, p["group_size"], K, widths, tuple(planes),
                             f["scale"].contiguous(), f["offset"].contiguous())


@triton.jit
def _plane(ptr, o64, s, j, mask, n8, W: tl.constexpr):
    """Codes of one plane for rows ``o64`` [BN] and slots ``s`` [BKW] -> int32 [BN, BKW, 8]."""
    if W == 8:
        c = s[None, :, None] * 8 + j[None, None, :]
        k = tl.load(ptr + o64[:, None, None] * n8 + c, mask=mask[:, :, None], other=0).to(tl.int32)
    else:
        word = tl.load(ptr + o64[:, None] * (n8 // 8) + s[None, :], mask=mask, other=0).to(tl.int32)
        k = (word[:, :, None] >> (j * W)[None, None, :]) & ((1 << W) - 1)
    return k


@triton.jit
def _fused_kernel(x_ptr, p0, p1, p2, s_ptr, o_ptr, y_ptr,
                  M, N, n, n8, G, stride_xm, slots_per_split, stride_split,
                  W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, GROUP: tl.constexpr,
                  INV_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
                  USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    # x: [M, n] (row stride stride_xm); planes see HypercFusedWeight; y: [splits, M, N]
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    o = pid_n * BN + tl.arange(0, BN)
    omask = o < N
    o64 = o.to(tl.int64)
    j = tl.arange(0, 8)
    mi = tl.arange(0, BM)
    nslots = n8 // 8
    s_begin = pid_k * slots_per_split
    s_end = tl.minimum(s_begin + slots_per_split, nslots)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BN, BKW, 8), dtype=tl.float32)
    for s0 in range(s_begin, s_end, BKW):
        s = s0 + tl.arange(0, BKW)
        smask = s < s_end
        mask = omask[:, None] & smask[None, :]
        k = _plane(p0, o64, s, j, mask, n8, W0)
        if W1 > 0:
            k = k | (_plane(p1, o64, s, j, mask, n8, W1) << W0)
        if W2 > 0:
            k = k | (_plane(p2, o64, s, j, mask, n8, W2) << (W0 + W1))
        kf = (k | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact float of k
        gs = (s * 8) // GROUP  # a slot of 8 columns lies in one group (GROUP % 8 == 0)
        sc = tl.load(s_ptr + o64[:, None] * G + gs[None, :], mask=mask, other=0.0).to(tl.float32) * INV_K
        of = tl.load(o_ptr + o64[:, None] * G + gs[None, :], mask=mask, other=0.0).to(tl.float32)
        c = s[:, None] * 8 + j[None, :]  # [BKW, 8] columns
        cmask = (c < n) & smask[:, None]
        if USE_DOT:
            w = kf * sc[:, :, None] + of[:, :, None]
            w2 = tl.reshape(w, (BN, BKW * 8)).to(x_ptr.dtype.element_ty)
            cf = s0 * 8 + tl.arange(0, BKW * 8)
            xt = tl.load(x_ptr + mi[:, None] * stride_xm + cf[None, :],
                         mask=(mi < M)[:, None] & (cf < n)[None, :] & (cf < s_end * 8)[None, :], other=0.0)
            if DOT_F32:  # the interpreter's bf16 tl.dot is wrong (Triton 3.9); same values in fp32
                acc += tl.dot(xt.to(tl.float32), tl.trans(w2.to(tl.float32)))
            else:
                acc += tl.dot(xt, tl.trans(w2))
        elif BM == 1:  # one row: per-lane FMAs into a tile accumulator, reduced once at the end
            xr = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            acc3 += (kf * sc[:, :, None] + of[:, :, None]) * xr[None, :, :]
        else:
            for r in tl.static_range(BM):
                xr = tl.load(x_ptr + r * stride_xm + c, mask=cmask & (c * 0 + r < M), other=0.0).to(tl.float32)
                part = tl.sum(kf * xr[None, :, :], axis=2)  # [BN, BKW]
                xs = tl.sum(xr, axis=1)  # [BKW]
                contrib = tl.sum(part * sc + of * xs[None, :], axis=1)  # [BN]
                acc += tl.where(mi[:, None] == r, contrib[None, :], 0.0)
    if BM == 1 and not USE_DOT:
        acc += tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
    ymask = (mi < M)[:, None] & omask[None, :]
    yp = y_ptr + pid_k * stride_split + mi[:, None] * N + o[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _dense(w: HypercFusedWeight, dtype: torch.dtype) -> Tensor:
    """The weight ``[out, in]`` in ``dtype`` (rows > 16 and the non-fused forms)."""
    if w.payload is not None:
        spec = TensorSpec(w.spec.name, (w.out_features, w.in_features), w.spec.dtype, w.spec.role)
        return decode(w.payload, spec, dtype)
    m, n = w.out_features, w.in_features
    n8 = -(-n // 8) * 8
    k = torch.zeros((m, n8), dtype=torch.int32, device=w.scale.device)
    shift = 0
    for t, wd in zip(w.planes, w.widths):
        if wd == 8:
            part = t.to(torch.int32)
        else:
            sh = torch.arange(8, device=t.device, dtype=torch.int32) * wd
            part = ((t.to(torch.int32).unsqueeze(-1) >> sh) & ((1 << wd) - 1)).view(m, n8)
        k |= part << shift
        shift += wd
    x = k[:, :n].to(torch.float32) / w.points
    sc = w.scale.float().repeat_interleave(w.group_size, dim=1)[:, :n]
    of = w.offset.float().repeat_interleave(w.group_size, dim=1)[:, :n]
    return torch.addcmul(of, x, sc).to(dtype)


def _mm_config(N: int, n: int, use_dot: bool, target: int) -> tuple[int, int, int, int]:
    """(BN, BKW, splits, slots per split) for ``N`` outputs, ``n`` inputs, about ``target`` programs."""
    nslots = -(-n // 8)
    bkw = 8 if not interpreting() else min(8, _pow2(nslots))
    bn = 64 if N >= 64 * _TARGET_PROGRAMS // 8 else 32
    if use_dot:
        bn = max(bn, 32)
    nb = -(-N // bn)
    splits = max(1, min(-(-target // nb), -(-nslots // bkw)))
    per = -(-(-(-nslots // splits)) // bkw) * bkw
    splits = -(-nslots // per)
    return bn, bkw, splits, per


def matmul(x: Tensor, w: HypercFusedWeight, *, programs: int | None = None) -> Tensor:
    """``x @ W^T`` for x ``[..., in]`` (bf16/fp16/fp32) -> ``[..., out]`` in x's dtype, without bias.

    Rows <= 16 of the fused form run one Triton kernel (fp32 accumulation); otherwise the weight
    is decoded into a temporary and ``F.linear`` runs. CUDA-graph capturable. ``programs``: the
    split-K target (default ``_TARGET_PROGRAMS_GEMV`` for one row, ``_TARGET_PROGRAMS`` for more).
    """
    if programs is not None and programs < 1:
        raise CodecError(f"hyperc matmul: programs must be >= 1, got {programs}")
    if x.shape[-1] != w.in_features:
        raise CodecError(f"hyperc matmul: x has {x.shape[-1]} features, the weight takes {w.in_features}")
    if x.dtype not in OUT_DTYPES:
        raise CodecError(f"hyperc matmul takes bf16/fp16/fp32 activations, got {x.dtype}")
    if w.scale is not None and x.device != w.scale.device:
        raise CodecError(f"hyperc matmul: x is on {x.device}, the weight on {w.scale.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    M, N, n = x2.shape[0], w.out_features, w.in_features
    if not w.planes or M > MAX_FUSED_ROWS or M == 0:
        return F.linear(x, _dense(w, x.dtype))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    use_dot = M > 1 and x.dtype != torch.float32
    bm = 16 if use_dot else _pow2(M)
    if programs is None:
        programs = _TARGET_PROGRAMS_GEMV if M == 1 else _TARGET_PROGRAMS
    bn, bkw, splits, per = _mm_config(N, n, use_dot, programs)
    if splits == 1:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    pl = list(w.planes) + [w.planes[0]] * (3 - len(w.planes))
    wd = list(w.widths) + [0] * (3 - len(w.widths))
    _fused_kernel[(triton.cdiv(N, bn), splits)](
        x2, pl[0], pl[1], pl[2], w.scale, w.offset, y, M, N, n, -(-n // 8) * 8, w.scale.shape[1],
        x2.stride(0), per, M * N, W0=wd[0], W1=wd[1], W2=wd[2], GROUP=w.group_size, INV_K=1.0 / w.points,
        BM=bm, BN=bn, BKW=bkw, USE_DOT=use_dot,
        DOT_F32=use_dot and interpreting() and x.dtype == torch.bfloat16, num_warps=4)
    if splits > 1:
        y = y.sum(0).to(x.dtype)
    return y.view(*lead, N)
