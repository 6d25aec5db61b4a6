"""Triton kernels for ``rtn``: a decode kernel and a fused small-batch decode-matmul.

``decode`` reads the payload as stored (one flat LSB-first bit stream of the row-major ``[m, n]``
codes, fp16 ``scale``/``offset`` per row and group) and writes ``q * scale + offset`` in float32,
cast on store. A program owns ``BLOCK_R`` (32) rows x 128 columns (4096 weights, 4 warps), one
grid axis. Two kernels:

- packed (2/4-bit, rows starting on whole bytes, ``group_size % 128 == 0``: 4-bit g128 as
  users run it): each thread loads 16 contiguous code bytes, splits them into codes, joins them
  back into column order and stores 32 contiguous outputs; one scale/offset per row and tile;
- gather (every other case): the 128 columns are viewed as ``[NG, GC]`` with ``GC`` the largest
  power of two dividing both the group size and 128, so each ``GC``-chunk lies inside one group
  and its scale/offset are loaded once per (row, chunk); each weight reads the byte(s) its code
  spans (two for widths that do not divide 8), neighbouring lanes neighbouring bytes (L1 hits).

``prepare`` repacks a 2-D payload once at load into ``RtnFusedWeight``: every row of codes starts
on a byte boundary (rows padded to whole 8-code chunks), scale and offset transposed to ``[G, m]``
so a tile's row block reads them contiguously. The resident size stays the compressed size
(``bits + 32/group_size`` bits per weight, plus row padding). ``matmul`` computes
``x @ W^T`` for up to 16 rows of ``x`` in one kernel: a program owns ``BLOCK_N`` output features
and a contiguous range of K tiles (split-K, fp32 atomics when split), accumulating in fp32. Batch
1 is an FMA reduction; batch 2..16 runs ``tl.dot`` on a 16-row tile of ``x`` against the
dequantised weight tile. For widths dividing 8 (2, 4, 8) a K tile is loaded as whole bytes
``[BLOCK_N, BLOCK_K*bits/8]`` and split into its ``8/bits`` code positions, each multiplied by the
matching strided slice of ``x``; other widths gather each code's bytes. On that fast path the next
K tile's bytes and side info are loaded while the current one is computed (register double
buffering: a loop without ``tl.dot`` is not pipelined by Triton). Configs are fixed by shape (no
autotuning: nothing to warm up before CUDA-graph capture beyond the first compile).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import Encoded, SharedState, TensorSpec
from ..bitpack import pack_bits
from ..errors import CodecError
from ..rtn import Rtn, _matrix_shape, unpack_codes
from . import interpreting

__all__ = ["decode", "prepare", "matmul", "RtnFusedWeight", "MAX_FUSED_ROWS"]

log = logging.getLogger(__name__)

MAX_FUSED_ROWS = 16  # rows of x the fused kernel takes; more decode the weight and call F.linear
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Programs a fused matmul aims for (row blocks x split-K), by rows of x. H200 (132 SMs), measured by
# gpu_bench.py's sweep (docs/GPU.md): one row is fastest with many short splits (4224: 25.4 us on
# 4096 x 11008 against 27.9 us at 528 and bf16 F.linear's 27.7); 8 and 16 rows (tl.dot, more
# atomics per split) lose with them (x0.74 / x0.55 of bf16 at 4224 against x0.83 / x0.71 at 528).
_TARGET_PROGRAMS = 132 * 4  # 2..16 rows
_TARGET_PROGRAMS_GEMV = 132 * 32  # 1 row
_WIDE_AT = 2**31 - 1  # offsets past int32: index in int64 (tests lower it)


# ---- decode -------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(codes_ptr, scale_ptr, offset_ptr, out_ptr, m, n, groups,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                   NG: tl.constexpr, GC: tl.constexpr, WIDE: tl.constexpr):
    # codes: [ceil(m*n/8)*BITS] uint8 (flat bit stream); scale, offset: [m, groups] f16; out: [m, n]
    # one grid axis (axis 1 stops at 65535 blocks): column blocks of a row block are neighbours
    cblocks = tl.cdiv(n, NG * GC)
    pid_r = tl.program_id(0) // cblocks
    pid_c = tl.program_id(0) % cblocks
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]  # [BR, 1, 1]
    chunk = pid_c * (NG * GC) + tl.arange(0, NG)[None, :, None] * GC  # [1, NG, 1] chunk starts
    c = chunk + tl.arange(0, GC)[None, None, :]  # [1, NG, GC]
    rmask = r < m
    mask = rmask & (c < n)
    if WIDE:
        r = r.to(tl.int64)
    grp = chunk // GROUP  # a GC-chunk never straddles a group: GC divides GROUP
    sidx = r * groups + grp
    smask = rmask & (chunk < n)
    sc = tl.load(scale_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    of = tl.load(offset_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    idx = r * n + c  # flat weight index
    if BITS == 8:
        q = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.int32)
    else:
        bit = idx * BITS
        lo = tl.load(codes_ptr + (bit >> 3), mask=mask, other=0).to(tl.int32)
        if 8 % BITS != 0:  # the code may run into the next byte
            hi = tl.load(codes_ptr + ((bit + (BITS - 1)) >> 3), mask=mask, other=0).to(tl.int32)
            lo = lo | (hi << 8)
        q = (lo >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
    w = q.to(tl.float32) * sc + of
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_packed_kernel(codes_ptr, scale_ptr, offset_ptr, out_ptr, m, n, groups, row_bytes,
                          BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    # Rows start on whole bytes (n * BITS % 8 == 0), BITS in {2, 4}, GROUP % BLOCK_C == 0.
    # codes: [m, row_bytes] uint8 (row-major view of the bit stream); scale, offset: [m, groups] f16
    EPB: tl.constexpr = 8 // BITS
    BB: tl.constexpr = BLOCK_C // EPB  # bytes per row of the tile
    cblocks = tl.cdiv(n, BLOCK_C)
    pid_r = tl.program_id(0) // cblocks
    pid_c = tl.program_id(0) % cblocks
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # [BR, 1]
    rmask = r < m
    if WIDE:
        r = r.to(tl.int64)
    jb = pid_c * BB + tl.arange(0, BB)[None, :]  # [1, BB] byte columns
    by = tl.load(codes_ptr + r * row_bytes + jb, mask=rmask & (jb < row_bytes), other=0).to(tl.int32)
    mk: tl.constexpr = (1 << BITS) - 1
    # codes of a byte, LSB first, interleaved back into column order: [BR, BB, EPB] -> [BR, BLOCK_C]
    if EPB == 2:
        q = tl.join(by & mk, by >> 4)
    else:
        q = tl.join(tl.join(by & mk, (by >> 4) & mk), tl.join((by >> 2) & mk, by >> 6))
    q = tl.reshape(q, (BLOCK_R, BLOCK_C))
    grp = (pid_c * BLOCK_C) // GROUP  # one group for the whole tile
    sc = tl.load(scale_ptr + r * groups + grp, mask=rmask, other=0.0).to(tl.float32)  # [BR, 1]
    of = tl.load(offset_ptr + r * groups + grp, mask=rmask, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * sc + of
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    tl.store(out_ptr + r * n + c, w.to(out_ptr.dtype.element_ty), mask=rmask & (c < n))


def _pow2_divisor(x: int, cap: int) -> int:
    """The largest power of two dividing ``x``, at most ``cap``."""
    p = 1
    while p < cap and x % (2 * p) == 0:
        p *= 2
    return p


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def decode(enc: Encoded, spec: TensorSpec, dtype: torch.dtype, out: Tensor | None = None,
           shared: SharedState | None = None) -> Tensor:
    """``Rtn.decode`` on the payload's device as one kernel; ``out`` (contiguous, ``spec.shape``,
    ``dtype``) is written and returned when given. Equal to the reference in float32 to round-off
    (``q * scale + offset`` may fuse into one FMA), and so within one rounding in bf16/fp16."""
    if dtype not in _OUT_DTYPES:
        raise CodecError(f"tensor {spec.name!r}: the rtn kernel writes float32, bfloat16 or float16, not {dtype}")
    f = Rtn.checked_fields(enc, spec, enc.fields["codes"].device)  # shapes/dtypes only: no host sync
    codes, scale, offset = f["codes"], f["scale"].contiguous(), f["offset"].contiguous()
    bits, g = int(enc.params["bits"]), int(enc.params["group_size"])
    m, n = _matrix_shape(tuple(spec.shape))
    if out is None:
        out = torch.empty(spec.shape, dtype=dtype, device=codes.device)
    elif tuple(out.shape) != tuple(spec.shape) or out.dtype != dtype or not out.is_contiguous() \
            or out.device != codes.device:
        raise CodecError(f"tensor {spec.name!r}: out must be a contiguous {dtype} {list(spec.shape)} tensor on "
                         f"{codes.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    if m * n == 0:
        return out
    block_c = 128
    gc = _pow2_divisor(g, block_c)
    block_r = min(32 if gc >= 8 else 8, _next_pow2(m))  # odd groups: a scale per few weights, fewer rows
    wide = (m * n + 8) * bits >= _WIDE_AT
    grid = (triton.cdiv(m, block_r) * triton.cdiv(n, block_c),)
    if bits in (2, 4) and (n * bits) % 8 == 0 and g % block_c == 0:  # the common case: 4-bit, g128
        _decode_packed_kernel[grid](codes, scale, offset, out, m, n, scale.shape[1], n * bits // 8,
                                    BITS=bits, GROUP=g, BLOCK_R=block_r, BLOCK_C=block_c, WIDE=wide,
                                    num_warps=4)
        return out
    _decode_kernel[grid](codes, scale, offset, out, m, n, scale.shape[1],
                         BITS=bits, GROUP=g, BLOCK_R=block_r, NG=block_c // gc, GC=gc, WIDE=wide,
                         num_warps=4)
    return out


# ---- fused decode-matmul ------------------------------------------------------------------------
@dataclass(frozen=True)
class RtnFusedWeight:
    """An rtn weight repacked once for ``matmul``: rows of codes byte-aligned, side info transposed.

    ``codes``: [m, row_bytes] uint8, row r = pack_bits of its n codes padded to a multiple of 8
    (LSB first: byte j holds codes j*8/bits .. for widths dividing 8);
    ``scale_t``, ``offset_t``: [G, m] float16 (G = ceil(n / group_size)).
    """

    codes: Tensor  # [m, row_bytes] uint8
    scale_t: Tensor  # [G, m] f16
    offset_t: Tensor  # [G, m] f16
    out_features: int
    in_features: int
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale_t, self.offset_t))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, self.out_features * self.in_features)


def prepare(enc: Encoded, spec: TensorSpec) -> RtnFusedWeight:
    """Repack a 2-D rtn payload (on its device) for ``matmul``; runs once at load, not graph-captured."""
    if len(spec.shape) != 2:
        raise CodecError(f"tensor {spec.name!r}: the fused rtn matmul needs a 2-D weight, got {list(spec.shape)}")
    dev = enc.fields["codes"].device
    f = Rtn.checked_fields(enc, spec, dev)
    bits, g = int(enc.params["bits"]), int(enc.params["group_size"])
    m, n = spec.shape
    if n % 8 == 0:  # every row already starts on a whole 8-code chunk
        codes = f["codes"].view(m, n * bits // 8)
    else:
        q = unpack_codes(f["codes"], bits, m * n).view(m, n)
        npad = -(-n // 8) * 8
        qp = torch.zeros((m, npad), dtype=torch.uint8, device=dev)
        qp[:, :n] = q
        codes = pack_bits(qp, bits).view(m, npad * bits // 8)
    return RtnFusedWeight(codes.contiguous(), f["scale"].t().contiguous(), f["offset"].t().contiguous(),
                          m, n, bits, g)


@triton.jit
def _codes_at(codes_ptr, row, k, mask, row_bytes, BITS: tl.constexpr):
    """Codes (int32) at rows ``row``, columns ``k`` of the byte-aligned row layout (gather)."""
    bit = k * BITS
    lo = tl.load(codes_ptr + row * row_bytes + (bit >> 3), mask=mask, other=0).to(tl.int32)
    if BITS != 8:
        if 8 % BITS != 0:
            hi = tl.load(codes_ptr + row * row_bytes + ((bit + (BITS - 1)) >> 3), mask=mask, other=0).to(tl.int32)
            lo = lo | (hi << 8)
        lo = (lo >> (bit & 7)) & ((1 << BITS) - 1)
    return lo


@triton.jit
def _tile_raw(codes_ptr, scale_ptr, offset_ptr, crow, rows, nmask, jj, t, t_end, N, row_bytes,
              GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EPB: tl.constexpr):
    """K tile ``t``'s whole code bytes [BN, BLOCK_K/EPB] (contiguous along each row) and the fp16
    scale/offset [BN] of the group holding its start; all masked off (zeros) unless ``t < t_end``."""
    k0 = t * BLOCK_K
    byte_k = (k0 // EPB) + jj
    ok = nmask & ((rows * 0 + t) < t_end)  # [BN]
    m2 = ok[:, None] & (byte_k[None, :] < row_bytes)
    by = tl.load(codes_ptr + crow[:, None] * row_bytes + byte_k[None, :], mask=m2, other=0)
    g0 = k0 // GROUP
    sc = tl.load(scale_ptr + g0 * N + rows, mask=ok, other=0.0)
    of = tl.load(offset_ptr + g0 * N + rows, mask=ok, other=0.0)
    return by, sc, of


@triton.jit
def _matmul_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, B, N, K, row_bytes, tiles_per_split,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_B: tl.constexpr, USE_DOT: tl.constexpr, ALIGNED: tl.constexpr,
                   SPLIT: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr, PREFETCH: tl.constexpr):
    # x: [B, K]; codes: [N, row_bytes] uint8; scale, offset: [G, N] f16; y: [B, N] (fp32 when SPLIT)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    EPB: tl.constexpr = 8 // BITS if 8 % BITS == 0 else 1  # codes per byte (1: gather path)
    KB: tl.constexpr = BLOCK_K // EPB  # columns per code position within a tile
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    nmask = rows < N
    crow = rows.to(tl.int64) if WIDE else rows  # for code offsets rows * row_bytes
    jj = tl.arange(0, KB)  # [KB]
    bb = tl.arange(0, BLOCK_B)  # [BB]
    bmask = bb < B
    n_tiles = tl.cdiv(K, BLOCK_K)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    # PREFETCH (EPB > 1 and ALIGNED): register double-buffering, the next tile's bytes and side info
    # are in flight while this tile is computed (a loop without tl.dot is not pipelined by Triton).
    if PREFETCH:
        by_n, sc_n, of_n = _tile_raw(codes_ptr, scale_ptr, offset_ptr, crow, rows, nmask, jj, t0, t1,
                                     N, row_bytes, GROUP, BLOCK_K, EPB)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        if PREFETCH:
            by = by_n.to(tl.int32)
            sc = sc_n.to(tl.float32)[:, None]
            of = of_n.to(tl.float32)[:, None]
            by_n, sc_n, of_n = _tile_raw(codes_ptr, scale_ptr, offset_ptr, crow, rows, nmask, jj, t + 1, t1,
                                         N, row_bytes, GROUP, BLOCK_K, EPB)
        else:
            if ALIGNED:  # the whole tile lies in one group: one scale/offset per output feature
                g0 = k0 // GROUP
                sc = tl.load(scale_ptr + g0 * N + rows, mask=nmask, other=0.0).to(tl.float32)[:, None]
                of = tl.load(offset_ptr + g0 * N + rows, mask=nmask, other=0.0).to(tl.float32)[:, None]
            if EPB > 1:
                by = _tile_raw(codes_ptr, scale_ptr, offset_ptr, crow, rows, nmask, jj, t, t1,
                               N, row_bytes, GROUP, BLOCK_K, EPB)[0].to(tl.int32)
        for p in tl.static_range(EPB):
            k = k0 + jj * EPB + p  # [KB] columns of code position p
            kmask = k < K
            if EPB > 1:
                q = ((by >> (p * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            else:
                q = _codes_at(codes_ptr, crow[:, None], k[None, :], nmask[:, None] & kmask[None, :],
                              row_bytes, BITS).to(tl.float32)
            if ALIGNED:
                w = q * sc + of
            else:
                gi = (k // GROUP)[None, :] * N + rows[:, None]
                gm = nmask[:, None] & kmask[None, :]
                w = q * tl.load(scale_ptr + gi, mask=gm, other=0.0).to(tl.float32) \
                    + tl.load(offset_ptr + gi, mask=gm, other=0.0).to(tl.float32)
            # w: [BN, KB]; columns k >= K hold the offset, but meet x == 0 there
            if USE_DOT:
                xt = tl.load(x_ptr + bb[:, None] * K + k[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
                if IEEE:  # fp32 x; and bf16 under the interpreter, whose bf16 tl.dot is wrong (Triton 3.9)
                    acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
            else:
                xv = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)  # batch 1
                acc2 += w * xv[None, :]
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BN]
    yp = y_ptr + bb[:, None] * N + rows[None, :]
    ymask = bmask[:, None] & nmask[None, :]
    if SPLIT:
        tl.atomic_add(yp, acc, mask=ymask)
    else:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _matmul_config(w: RtnFusedWeight, target: int) -> tuple[int, int, bool, int]:
    """(BLOCK_N, BLOCK_K, aligned, num_warps) for a weight: K tiles inside one group when the group
    allows; the widest row block that still leaves ``target`` programs after split-K (more bytes in
    flight per program), 128 rows only for widths dividing 8 up to 4 (register budget)."""
    g = w.group_size
    bk = _pow2_divisor(g, 256)
    aligned = bk >= 32
    if not aligned:
        bk = 128
    epb = 8 // w.bits if 8 % w.bits == 0 else 1
    bk = max(bk, 16 * epb)  # tl.dot needs K >= 16 per code position
    aligned = aligned and g % bk == 0
    n_tiles = triton.cdiv(w.in_features, bk)
    block_n = 32
    for bn in ((128, 64) if epb >= 2 else (64,)):
        if triton.cdiv(w.out_features, bn) * n_tiles >= target:
            block_n = bn
            break
    return block_n, bk, aligned, 8 if block_n == 128 or epb == 1 else 4  # gathers: 8 warps, fewer regs each


def matmul(x: Tensor, w: RtnFusedWeight, *, programs: int | None = None) -> Tensor:
    """``x @ W^T`` with ``W`` decoded inside the kernel: x [..., in] (bf16/fp16/fp32) -> [..., out] in
    x's dtype, accumulated in fp32. Up to 16 rows run fused; more decode ``W`` once into a temporary
    and call ``F.linear``. No bias. Graph-capturable (no host syncs). ``programs``: the split-K
    target (default ``_TARGET_PROGRAMS_GEMV`` for one row, ``_TARGET_PROGRAMS`` for more)."""
    if programs is not None and programs < 1:
        raise CodecError(f"rtn matmul: programs must be >= 1, got {programs}")
    if x.shape[-1] != w.in_features:
        raise CodecError(f"rtn matmul: x has {x.shape[-1]} input features, the weight {w.in_features}")
    if x.dtype not in _OUT_DTYPES:
        raise CodecError(f"rtn matmul: x must be float32, bfloat16 or float16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features).contiguous()
    batch, n_out, k = x2.shape[0], w.out_features, w.in_features
    if batch == 0:
        return x.new_empty(*lead, n_out)
    if batch > MAX_FUSED_ROWS:
        return torch.nn.functional.linear(x2, _decode_fused(w, x.dtype)).view(*lead, n_out)
    target = programs if programs is not None else _TARGET_PROGRAMS_GEMV if batch == 1 else _TARGET_PROGRAMS
    block_n, block_k, aligned, warps = _matmul_config(w, target)
    n_blocks = triton.cdiv(n_out, block_n)
    n_tiles = triton.cdiv(k, block_k)
    split = max(1, min(n_tiles, triton.cdiv(target, n_blocks)))
    per = triton.cdiv(n_tiles, split)
    split = triton.cdiv(n_tiles, per)  # no empty programs
    use_dot = batch > 1
    if use_dot and x.dtype == torch.float32:
        warps = 8  # the fp32 (ieee) dot needs twice the registers
    if split > 1:
        y = torch.zeros((batch, n_out), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((batch, n_out), dtype=x.dtype, device=x.device)
    _matmul_kernel[(n_blocks, split)](
        x2, w.codes, w.scale_t, w.offset_t, y, batch, n_out, k, w.codes.shape[1], per,
        BITS=w.bits, GROUP=w.group_size, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_B=16 if use_dot else 1, USE_DOT=use_dot, ALIGNED=aligned, SPLIT=split > 1,
        IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
        WIDE=w.codes.numel() >= _WIDE_AT, PREFETCH=aligned and 8 % w.bits == 0 and w.bits < 8,
        num_warps=warps)
    return y.to(x.dtype).view(*lead, n_out)


def _decode_fused(w: RtnFusedWeight, dtype: torch.dtype) -> Tensor:
    """The decoded ``[out, in]`` weight from the repacked layout (the > 16 rows path)."""
    m, n = w.out_features, w.in_features
    npad = w.codes.shape[1] * 8 // w.bits
    spec = TensorSpec("rtn.fused", (m, npad), dtype, "linear")
    g = w.group_size
    groups = -(-npad // g)
    sc, of = w.scale_t.t(), w.offset_t.t()
    if groups > sc.shape[1]:  # row padding past the last group: repeat it (those columns are cut)
        extra = groups - sc.shape[1]
        sc = torch.cat([sc, sc[:, -1:].expand(m, extra)], 1)
        of = torch.cat([of, of[:, -1:].expand(m, extra)], 1)
    enc = Encoded({"codes": w.codes.reshape(-1), "scale": sc.contiguous(), "offset": of.contiguous()},
                  {"bits": w.bits, "group_size": g})
    return decode(enc, spec, dtype)[:, :n]
