"""Triton kernels of the ``cvxq`` codec: decode, and a fused decode-matmul for at most 16 rows.

Payload (``codecs/cvxq.py``; ``K = R * n`` groups of ``G`` output rows x 1 input column)::

    depth:  [ceil(K/8) * 4] uint8    # 4-bit depths, group k = r*n + j, low nibble first
    loc:    [R, n] float16           # natural order
    scale:  [K - c_0] float16        # depth-sorted order (stable sort of the groups by depth)
    codes:  [sum_b ceil(c_b*G/8)*b] uint8  # segment b = 1..8: the depth-b groups in increasing k,
                                           # G codes each, one LSB-first bit stream per segment

A group of depth ``b`` and rank ``rank`` among the depth-``b`` groups has its codes at bit
``seg_bit[b] + rank * G * b`` and its scale at ``scale_start[b] + rank``.

``decode`` (the payload as stored, 3 launches, no host sync): the rank is the only quantity that
needs the depths of every earlier group, so it comes from a small table of prefix counts: for each
*chunk* of ``CHUNK = 32`` consecutive columns of one row block (chunk ``t = r * NC + j // CHUNK``,
``NC = ceil(n / CHUNK)``) the inclusive count of each depth over chunks ``0..t``::

    prefix: [9, R * NC] int32        # _hist_kernel (one launch) + torch.cumsum, per call

The table is depth-major so that the scan runs along its last dimension: PyTorch scans an inner
dimension in parallel, but an outer one with one thread per column walking every row in turn. The
chunk-major [R * NC, 9] layout of the first version cost 174 ns per chunk on the H200, 1.3 ms of the
1.33 ms decode of 4096 x 11008 (gpu_check, 2026-11-30): the kernel itself was not the bottleneck.

A program takes one row block x ``BJ = 32`` columns: it derives its groups' state once (in-tile
exclusive count by ``tl.cumsum`` over [BJ, 16] one-hot depths + the previous chunk's row), then
walks the block's ``G`` rows ``BI`` at a time (64 for G = 192: no waste).

``prepare`` / ``matmul`` (at most 16 rows): depth-uniform tiles. ``prepare`` (once, on the device)
sorts each row block's columns by depth (``perm: [R, n] int16``, ``cs``: where each depth class
starts) and regroups the codes of each class (row block r, depth b, ``C`` columns) into planes of
4, 2 and 1 bits (b = 3: 2+1, 5: 4+1, 6: 4+2, 7: 4+2+1, 8: 4+4), each an array ``[ceil(G/8), C]`` of
*units* -- 8 consecutive rows of one group, LSB first (uint8 / int16 / int32 for 1 / 2 / 4 bits) --
with consecutive columns at consecutive addresses; scales and locations are stored in the sorted
order. Resident: the payload's code bits (rows padded to 8) + 48 bits per group (column, scale,
location) + 232 bytes per row block: 4.32 bits/weight for the benchmark's 4.25 bpw payload of
4096 x 11008 (G = 192; 3.7x less than bf16).

A matmul program takes ``BI`` rows (64 for G = 192: three tiles per block, none wasted) and a
split of the block's tiles (``TILE_COLS = 32`` sorted columns of one depth class; only a class's
last tile is partial, ``ts``: first tile of each class). It walks the 9 depth classes with the depth
static (``tl.static_range``), so the unpacking is specialised: one unit load per plane per 8
weights, constant shifts and masks, a level-table load (``[9, 256]`` float32, L1-resident; one
128-byte line for depths <= 5). x is gathered through ``perm`` ([<= 16, n]: L1/L2). ``w = level *
scale + loc`` is split: ``sum_j (x_j scale_j) level_ij`` per weight (one FMA), ``sum_j x_j loc_j``
once per column. The next tile's loads are issued before the current tile's math (software
pipelining by hand). The tile is ``[8, BI/8, 32]`` (slot t of a unit first: Triton then keeps a
unit's 8 codes in the thread that loaded it -- no shared-memory round trip). One row: fp32 FMAs
reduced once at the end; 2..16 rows: ``tl.dot`` with M padded to 16 (levels and ``x * scale`` in
x's dtype). fp32 partial sums per split are added by one ``torch.sum``.

sm_90 SASS of the one-row loop (Triton 3.9, 64 x 32 tile, 4 warps, 80 registers): 8.1-8.4
instructions per weight for depths 1, 2, 4; 10.4-11.1 for 3, 5, 6, 8; 13.9 for 7 (the previous
generic-depth kernel: ~30); 1.4 loads per weight (the level table: 1). ``tl.dot`` path: 17-24.

Corrupt payloads: ``decode`` does not re-check the depth histogram against ``counts`` (a host
sync; ``prepare`` checks it once). Every group is read only when its codes and scale lie inside
their fields, so a damaged payload decodes to garbage, never to an out-of-bounds read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..base import Encoded, TensorSpec
from ..bitpack import packed_nbytes
from ..cvxq import MAX_DEPTH, Cvxq, group_layout, levels
from ..errors import CodecError, CorruptPayloadError
from ..rtn import unpack_codes
from . import interpreting

__all__ = ["decode", "prepare", "matmul", "CvxqFusedWeight", "CHUNK", "MAX_FUSED_ROWS"]

CHUNK = 32  # columns per prefix-table row; every kernel's BJ is a multiple of it
MAX_FUSED_ROWS = 16  # matmul rows handled by the fused kernel; more: decode + F.linear
TILE_COLS = 32  # matmul tile width (sorted columns of one depth class)
# Programs a fused matmul aims for (row tiles x split-K), by rows of x. H200 (132 SMs), measured by
# gpu_bench.py's sweep on 4096 x 11008 (docs/GPU.md, two runs): one row 101.1 us at 1056 against
# 119.2 us at 528 (132: 167.8, 4224: 122.1).
_TARGET_PROGRAMS = 132 * 4  # 2..16 rows
_TARGET_PROGRAMS_GEMV = 132 * 8  # 1 row
_SCALARS = ["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"]
_LEVELS: dict[torch.device, Tensor] = {}


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _hist_kernel(depth_ptr, hist_ptr, T, NC, n, HB: tl.constexpr, CH: tl.constexpr):
    """hist[b, t] (t < T = R*NC, b < 9) = groups of depth b among chunk t's columns."""
    t = tl.program_id(0) * HB + tl.arange(0, HB)  # [HB] chunk ids
    r = t // NC
    j = (t % NC)[:, None] * CH + tl.arange(0, CH)[None, :]  # [HB, CH] columns
    valid = (t < T)[:, None] & (j < n)
    k = r.to(tl.int64)[:, None] * n + j  # group ids
    byte = tl.load(depth_ptr + (k >> 1), mask=valid, other=0).to(tl.int32)
    d = (byte >> ((k & 1) * 4).to(tl.int32)) & 15
    d = tl.where(valid, tl.minimum(d, 8), -1)
    for b in tl.static_range(9):
        cnt = tl.sum((d == b).to(tl.int32), 1)
        tl.store(hist_ptr + b * T + t, cnt, mask=t < T)


@triton.jit
def _bases(S1, S2, S3, S4, S5, S6, S7, S8, C1, C2, C3, C4, C5, C6, C7, C8):
    """[16] per depth b: bit where segment b starts (int64), index of its first scale (int32)."""
    bins = tl.arange(0, 16)
    seg = tl.where(bins == 1, S1, 0).to(tl.int64)
    seg = tl.where(bins == 2, S2, seg)
    seg = tl.where(bins == 3, S3, seg)
    seg = tl.where(bins == 4, S4, seg)
    seg = tl.where(bins == 5, S5, seg)
    seg = tl.where(bins == 6, S6, seg)
    seg = tl.where(bins == 7, S7, seg)
    seg = tl.where(bins == 8, S8, seg)
    sst = tl.where(bins == 1, C1, 0)
    sst = tl.where(bins == 2, C2, sst)
    sst = tl.where(bins == 3, C3, sst)
    sst = tl.where(bins == 4, C4, sst)
    sst = tl.where(bins == 5, C5, sst)
    sst = tl.where(bins == 6, C6, sst)
    sst = tl.where(bins == 7, C7, sst)
    sst = tl.where(bins == 8, C8, sst)
    return seg, sst


@triton.jit
def _groups(codes_ptr, depth_ptr, loc_ptr, scale_ptr, prefix_ptr, lv_ptr, seg, sst, r, j0, m, n, G, NC, nbytes,
            nscale, BJ: tl.constexpr, CH: tl.constexpr):
    """Per-group state of columns ``j0 .. j0+BJ`` of row block ``r``, each [1, BJ, 1]: depth, pointer
    to the byte of its first code and the bit inside it, whether it has codes, scale, location and
    its level-table row. Computed on [BJ, 16] one-hot tiles (rank = previous chunk's inclusive
    count + in-tile exclusive count), once per program and reused for every row slice."""
    j = j0 + tl.arange(0, BJ)
    j_ok = j < n
    k = r.to(tl.int64) * n + j  # [BJ] group ids
    dbyte = tl.load(depth_ptr + (k >> 1), mask=j_ok, other=0).to(tl.int32)
    d = (dbyte >> ((k & 1) * 4).to(tl.int32)) & 15
    d = tl.where(j_ok, tl.minimum(d, 8), 0)  # corrupt nibbles 9..15 clamp to 8
    bins = tl.arange(0, 16)
    hit = d[:, None] == bins[None, :]  # [BJ, 16]
    onehot = hit.to(tl.int32)
    t = r * NC + j0 // CH
    T = (m + G - 1) // G * NC  # chunks in the table: R row blocks of NC chunks (group_layout's R)
    pre = tl.load(prefix_ptr + bins.to(tl.int64) * T + (t - 1), mask=bins < tl.where((t > 0) & (j0 < n), 9, 0),
                  other=0)
    rank = tl.cumsum(onehot, 0) - onehot + pre[None, :]
    gbit = tl.sum(tl.where(hit, seg[None, :] + rank.to(tl.int64) * (G * bins)[None, :], 0), 1)  # [BJ] first code's bit
    sidx = tl.sum(tl.where(hit, sst[None, :] + rank, 0), 1)
    # a group is read only when all its bytes and its scale lie inside their fields (corrupt payloads)
    coded = j_ok & (d > 0) & (((gbit + G * d + 7) >> 3) <= nbytes) & (sidx < nscale)
    sc = tl.load(scale_ptr + sidx, mask=coded, other=0.0).to(tl.float32)
    lo = tl.load(loc_ptr + k, mask=j_ok, other=0.0).to(tl.float32)
    return (d[None, :, None], (codes_ptr + (gbit >> 3))[None, :, None], (gbit & 7).to(tl.int32)[None, :, None],
            coded[None, :, None], sc[None, :, None], lo[None, :, None], (lv_ptr + d * 256)[None, :, None])


@triton.jit
def _codes(d, gp, gsh, coded, sc, lo, lvp, i, i_ok):
    """Weights of the groups (``_groups``) at rows ``i`` [NREP, 1, 32] -> [NREP, BJ, 32] float32.

    Layout: the 32 lanes of a warp run along 32 consecutive rows (consecutive codes of one group:
    the same bytes), the warps along the columns, each thread repeats over NREP row slices. Per
    weight: one byte load (a second only for a code that crosses a byte), shift, mask, one
    level-table load (9 KB, L1-resident), one multiply-add; depth 0 reads nothing (level 0, scale 0)."""
    rel = gsh + i * d
    sh = rel & 7
    p = gp + (rel >> 3)
    ok = coded & i_ok
    b0 = tl.load(p, mask=ok, other=0).to(tl.int32)
    b1 = tl.load(p + 1, mask=ok & (sh + d > 8), other=0).to(tl.int32)
    q = ((b0 | (b1 << 8)) >> sh) & ((1 << d) - 1)
    v = tl.load(lvp + q)  # [9*256] table: always in range (d <= 8, q < 256)
    return v * sc + lo


@triton.jit
def _rows(rt, G, m, BI: tl.constexpr):
    """Row block, rows inside it [NREP, 1, 32] and their validity for row tile ``rt``."""
    nib = (G + BI - 1) // BI
    r = rt // nib
    i = (rt % nib) * BI + tl.arange(0, BI // 32)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    return r, i, (i < G) & (r * G + i < m)


@triton.jit(do_not_specialize=_SCALARS)
def _decode_kernel(out_ptr, codes_ptr, depth_ptr, loc_ptr, scale_ptr, prefix_ptr, lv_ptr, m, n, G, NC, nbytes,
                   nscale, S1, S2, S3, S4, S5, S6, S7, S8, C1, C2, C3, C4, C5, C6, C7, C8,
                   BJ: tl.constexpr, BI: tl.constexpr, CH: tl.constexpr):
    """out[m, n] = the decoded weight; program (row block r, column tile) writes rows r*G .. r*G+G
    of BJ columns, BI rows at a time, from one computation of its groups' state."""
    r = tl.program_id(0)
    j0 = tl.program_id(1) * BJ
    seg, sst = _bases(S1, S2, S3, S4, S5, S6, S7, S8, C1, C2, C3, C4, C5, C6, C7, C8)
    d, gp, gsh, coded, sc, lo, lvp = _groups(codes_ptr, depth_ptr, loc_ptr, scale_ptr, prefix_ptr, lv_ptr, seg, sst,
                                             r, j0, m, n, G, NC, nbytes, nscale, BJ, CH)
    j = (j0 + tl.arange(0, BJ))[None, :, None]
    base = tl.arange(0, BI // 32)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]  # [NREP, 1, 32]
    for i0 in range(0, G, BI):
        i = i0 + base
        row = r * G + i
        i_ok = (i < G) & (row < m)
        w = _codes(d, gp, gsh, coded, sc, lo, lvp, i, i_ok)
        tl.store(out_ptr + (row.to(tl.int64) * n + j), w.to(out_ptr.dtype.element_ty), mask=(j < n) & i_ok)


@triton.jit
def _ld(ptr, cb_ptr, u, pos, C, ok):
    """One plane's units [U, BJ] int32 (one unit = 8 consecutive rows of a group; consecutive
    columns of a class at consecutive addresses): one load per 8 weights."""
    return tl.load(ptr + (tl.load(cb_ptr) + u.to(tl.int64) * C + pos), mask=ok, other=0).to(tl.int32)


@triton.jit
def _units(p1_ptr, p2_ptr, p4_ptr, cb_ptr, u, pos, C, ok, B: tl.constexpr):
    """The planes (``_PLANES``: 4, 2 and 1 bits, low bits first) of a tile whose groups all have
    depth ``B`` (1..8), as up to three [U, BJ] int32 unit tensors (unused ones 0); ``cb_ptr``
    points at the class's plane bases ``cbase[r, B-1, :]``."""
    z = tl.zeros_like(u + pos)
    if B == 1:
        v0, v1, v2 = _ld(p1_ptr, cb_ptr, u, pos, C, ok), z, z
    elif B == 2:
        v0, v1, v2 = _ld(p2_ptr, cb_ptr, u, pos, C, ok), z, z
    elif B == 3:
        v0, v1, v2 = _ld(p2_ptr, cb_ptr, u, pos, C, ok), _ld(p1_ptr, cb_ptr + 1, u, pos, C, ok), z
    elif B == 4:
        v0, v1, v2 = _ld(p4_ptr, cb_ptr, u, pos, C, ok), z, z
    elif B == 5:
        v0, v1, v2 = _ld(p4_ptr, cb_ptr, u, pos, C, ok), _ld(p1_ptr, cb_ptr + 1, u, pos, C, ok), z
    elif B == 6:
        v0, v1, v2 = _ld(p4_ptr, cb_ptr, u, pos, C, ok), _ld(p2_ptr, cb_ptr + 1, u, pos, C, ok), z
    elif B == 7:
        v0, v1, v2 = (_ld(p4_ptr, cb_ptr, u, pos, C, ok), _ld(p2_ptr, cb_ptr + 1, u, pos, C, ok),
                      _ld(p1_ptr, cb_ptr + 2, u, pos, C, ok))
    else:
        v0, v1, v2 = _ld(p4_ptr, cb_ptr, u, pos, C, ok), _ld(p4_ptr, cb_ptr + 1, u, pos, C, ok), z
    return v0, v1, v2


@triton.jit
def _bits(v, W: tl.constexpr, O: tl.constexpr):
    """Units [U, BJ] -> bits ``O .. O+W`` of their 8 codes, [8, U, BJ] (slot t first: Triton then
    keeps a unit's 8 codes in the thread that loaded it); constant shifts."""
    t = tl.arange(0, 8)[:, None, None]
    return ((v[None, :, :] >> (t * W)) & ((1 << W) - 1)) << O


@triton.jit
def _unpack(v0, v1, v2, lv_ptr, B: tl.constexpr):
    """Levels [8, U, BJ] float32 (row ``u*8 + t`` at ``[t, u, j]``) of ``_units``' planes."""
    if B == 1:
        q = _bits(v0, 1, 0)
    elif B == 2:
        q = _bits(v0, 2, 0)
    elif B == 3:
        q = _bits(v0, 2, 0) | _bits(v1, 1, 2)
    elif B == 4:
        q = _bits(v0, 4, 0)
    elif B == 5:
        q = _bits(v0, 4, 0) | _bits(v1, 1, 4)
    elif B == 6:
        q = _bits(v0, 4, 0) | _bits(v1, 2, 4)
    elif B == 7:
        q = _bits(v0, 4, 0) | _bits(v1, 2, 4) | _bits(v2, 1, 6)
    else:
        q = _bits(v0, 4, 0) | _bits(v1, 4, 4)
    return tl.load(lv_ptr + (B * 256 + q))  # row B of the [9, 256] table: 4 B * 2**B, one L1 line for B <= 5


@triton.jit
def _levels(p1_ptr, p2_ptr, p4_ptr, cb_ptr, lv_ptr, u, pos, C, ok, B: tl.constexpr):
    """Levels [8, U, BJ] float32 of a depth-``B`` tile (``_units`` then ``_unpack``)."""
    v0, v1, v2 = _units(p1_ptr, p2_ptr, p4_ptr, cb_ptr, u, pos, C, ok, B)
    return _unpack(v0, v1, v2, lv_ptr, B)


@triton.jit
def _matmul_kernel(x_ptr, part_ptr, perm_ptr, cs_ptr, ts_ptr, cbase_ptr, p1_ptr, p2_ptr, p4_ptr, scale_ptr, loc_ptr,
                   lv_ptr, M, m, n, G, GU, TPS, BM: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """part[s, :M, rows] = x[:M, :] @ W[rows, cols_s]^T for program (row tile, split s).

    The row block's columns, sorted by depth (``perm``), form per depth class ``ceil(C/BJ)`` tiles
    of BJ columns (only a class's last tile is partial; ``ts``: first tile of each class); split s
    takes tiles ``s*TPS .. s*TPS+TPS``, one depth class at a time (``B`` static: unpacking
    specialised per depth), x gathered through ``perm``. ``w = level * scale + loc`` is split:
    ``sum_j (x_j scale_j) level_ij`` per weight, ``sum_j x_j loc_j`` once per column (every row
    of the block shares it)."""
    rt = tl.program_id(0)
    s = tl.program_id(1)
    nib = (G + BI - 1) // BI
    r = rt // nib
    it = rt % nib
    U: tl.constexpr = BI // 8
    u = it * U + tl.arange(0, U)[:, None]  # [U, 1] units of 8 rows inside the block
    uok = u < GU
    s0 = s * TPS
    xm = tl.arange(0, BM)
    if USE_DOT:
        acc = tl.zeros([BM, BI], dtype=tl.float32)
        cl = tl.zeros([BM, BJ], dtype=tl.float32)
    else:
        acc = tl.zeros([8, U, BJ], dtype=tl.float32)
        cl = tl.zeros([BJ], dtype=tl.float32)
    rowp = r.to(tl.int64) * n
    for B in tl.static_range(9):  # depth classes 0..8
        c0 = tl.load(cs_ptr + r * 10 + B)
        c1 = tl.load(cs_ptr + r * 10 + B + 1)
        t0 = tl.load(ts_ptr + r * 10 + B)
        t_lo = tl.maximum(t0, s0)
        t_hi = tl.minimum(tl.load(ts_ptr + r * 10 + B + 1), s0 + TPS)
        cb = cbase_ptr + (r * 8 + B) * 3 - 3  # class (r, B)'s plane bases (read only for B >= 1)
        # software pipelining by hand: the next tile's loads are issued before this tile's math
        p = c0 + (t_lo - t0) * BJ + tl.arange(0, BJ)
        pok = p < tl.where(t_lo < t_hi, c1, 0)  # (a scalar & a tensor upsets the interpreter)
        col = tl.load(perm_ptr + rowp + p, mask=pok, other=0).to(tl.int32)
        sc = tl.load(scale_ptr + rowp + p, mask=pok, other=0.0).to(tl.float32)
        lc = tl.load(loc_ptr + rowp + p, mask=pok, other=0.0).to(tl.float32)
        if B > 0:
            v0, v1, v2 = _units(p1_ptr, p2_ptr, p4_ptr, cb, u, (p - c0)[None, :], c1 - c0, uok & pok[None, :], B)
        for tt in range(t_lo, t_hi):
            pn = p + BJ
            okn = pn < tl.where(tt + 1 < t_hi, c1, 0)
            coln = tl.load(perm_ptr + rowp + pn, mask=okn, other=0).to(tl.int32)
            scn = tl.load(scale_ptr + rowp + pn, mask=okn, other=0.0).to(tl.float32)
            lcn = tl.load(loc_ptr + rowp + pn, mask=okn, other=0.0).to(tl.float32)
            if USE_DOT:
                xt = tl.load(x_ptr + xm[:, None] * n + col[None, :], mask=(xm < M)[:, None] & pok[None, :],
                             other=0.0).to(tl.float32)
                cl += xt * lc[None, :]
            else:
                xv = tl.load(x_ptr + col, mask=pok, other=0.0).to(tl.float32)
                cl += xv * lc
            if B > 0:
                w0, w1, w2 = _units(p1_ptr, p2_ptr, p4_ptr, cb, u, (pn - c0)[None, :], c1 - c0, uok & okn[None, :],
                                    B)
                lv = _unpack(v0, v1, v2, lv_ptr, B)
                if USE_DOT:
                    w2d = tl.reshape(tl.permute(lv, (2, 1, 0)), (BJ, BI))  # [BJ, BI], row u*8 + t
                    xs = xt * sc[None, :]
                    if DOT_F32:  # Triton's interpreter multiplies bf16 operands wrongly; fp32 instead
                        acc += tl.dot(xs, w2d)
                    else:
                        acc += tl.dot(xs.to(x_ptr.dtype.element_ty), w2d.to(x_ptr.dtype.element_ty))
                else:
                    acc += lv * (xv * sc)[None, None, :]
                v0, v1, v2 = w0, w1, w2
            p, pok, col, sc, lc = pn, okn, coln, scn, lcn
    if USE_DOT:
        y = acc + tl.sum(cl, 1)[:, None]
        i2 = it * BI + tl.arange(0, BI)
        row2 = r * G + i2
        offs = (s * M + xm)[:, None].to(tl.int64) * m + row2[None, :]
        tl.store(part_ptr + offs, y, mask=(xm < M)[:, None] & ((i2 < G) & (row2 < m))[None, :])
    else:
        y = tl.sum(acc, 2) + tl.sum(cl, 0)  # [8, U]
        i = tl.reshape(u, (1, U)) * 8 + tl.arange(0, 8)[:, None]
        row = r * G + i
        tl.store(part_ptr + s.to(tl.int64) * m + row, y, mask=(i < G) & (row < m))


@triton.jit
def _packed_decode_kernel(out_ptr, perm_ptr, cs_ptr, cbase_ptr, p1_ptr, p2_ptr, p4_ptr, scale_ptr, loc_ptr, lv_ptr,
                          m, n, G, GU, BJ: tl.constexpr, BI: tl.constexpr):
    """The weight from ``prepare``'s layout (the matmul's path for more than 16 rows): program
    (row tile, sorted positions ``BJ*c .. BJ*c+BJ``) writes its weights at their columns ``perm``."""
    rt = tl.program_id(0)
    q0 = tl.program_id(1) * BJ
    nib = (G + BI - 1) // BI
    r = rt // nib
    it = rt % nib
    U: tl.constexpr = BI // 8
    u = it * U + tl.arange(0, U)[:, None]
    uok = u < GU
    i = u[None, :, :] * 8 + tl.arange(0, 8)[:, None, None]  # [8, U, 1] rows in the block
    row = r * G + i
    i_ok = (i < G) & (row < m)
    rowp = r.to(tl.int64) * n
    for B in tl.static_range(9):  # depth classes 0..8
        c0 = tl.load(cs_ptr + r * 10 + B)
        c1 = tl.load(cs_ptr + r * 10 + B + 1)
        for p0 in range(tl.maximum(c0, q0), tl.minimum(c1, q0 + BJ), BJ):  # at most once
            p = p0 + tl.arange(0, BJ)
            pok = p < tl.minimum(c1, q0 + BJ)
            col = tl.load(perm_ptr + rowp + p, mask=pok, other=0).to(tl.int32)
            lc = tl.load(loc_ptr + rowp + p, mask=pok, other=0.0).to(tl.float32)[None, None, :]
            if B > 0:
                sc = tl.load(scale_ptr + rowp + p, mask=pok, other=0.0).to(tl.float32)[None, None, :]
                lv = _levels(p1_ptr, p2_ptr, p4_ptr, cbase_ptr + (r * 8 + B - 1) * 3, lv_ptr, u, (p - c0)[None, :],
                             c1 - c0, uok & pok[None, :], B)
                w = lv * sc + lc
            else:
                w = lc + tl.zeros([8, U, BJ], dtype=tl.float32)
            tl.store(out_ptr + (row.to(tl.int64) * n + col[None, None, :]), w.to(out_ptr.dtype.element_ty),
                     mask=pok[None, None, :] & i_ok)


# ---- host side --------------------------------------------------------------------------------
def _level_table(device: torch.device) -> Tensor:
    """[9 * 256] float32 on ``device``: row b holds ``levels(b)`` (built on the CPU: identical values
    to the reference), row 0 and the tails are 0. Cached per device; built on first use (outside a
    CUDA-graph capture: the runtime decodes once before capturing)."""
    lv = _LEVELS.get(device)
    if lv is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise CodecError("the cvxq kernels build their level table on first use, which a CUDA graph "
                             "capture cannot do; run one decode or prepare on this device before capturing")
        tab = torch.zeros(MAX_DEPTH + 1, 256, dtype=torch.float32)
        for b in range(1, MAX_DEPTH + 1):
            tab[b, : 1 << b] = levels(b)
        lv = _LEVELS[device] = tab.reshape(-1).to(device)
    return lv


def _offsets(counts: list[int], g: int) -> tuple[list[int], list[int]]:
    """Per depth 1..8: the bit where its code segment starts, and the index of its first scale."""
    seg, sst, byte, s = [], [], 0, 0
    for b in range(1, MAX_DEPTH + 1):
        seg.append(byte * 8)
        sst.append(s)
        byte += packed_nbytes(counts[b] * g, b) if counts[b] else 0
        s += counts[b]
    return seg, sst


def _prefix(depth: Tensor, r: int, n: int) -> Tensor:
    """[9, R * NC] int32 inclusive per-depth counts by chunk (one Triton launch + one cumsum along
    the last dimension, which PyTorch scans in parallel)."""
    nc = triton.cdiv(n, CHUNK)
    t = r * nc
    hist = torch.empty((9, t), dtype=torch.int32, device=depth.device)
    hb = 32
    _hist_kernel[(triton.cdiv(t, hb),)](depth, hist, t, nc, n, HB=hb, CH=CHUNK)
    return torch.cumsum(hist, 1, dtype=torch.int32)


def _tile_rows(g: int) -> int:
    """BI: 32 lanes x NREP row slices per tile (64 for G = 192: three tiles, none wasted)."""
    return 64 if g % 64 == 0 and g % 128 else max(32, min(128, triton.next_power_of_2(g)))


def decode(enc: Encoded, spec: TensorSpec, dtype: torch.dtype, out: Tensor | None = None,
           shared=None) -> Tensor:
    """``Cvxq.decode(enc, spec, shared, device, dtype)`` in one Triton pass (plus the prefix table),
    on the payload's device; writes into ``out`` (contiguous, ``spec.shape``, ``dtype``) when given."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CodecError(f"tensor {spec.name!r}: the cvxq kernel decodes to float32/bfloat16/float16, not {dtype}")
    dev = enc.fields["loc"].device
    f = Cvxq.checked_fields(enc, spec, dev)
    counts = enc.params["counts"]
    m, n, g, r = group_layout(tuple(spec.shape), enc.params["group_rows"])
    if out is None:
        out = torch.empty(spec.shape, dtype=dtype, device=dev)
    elif tuple(out.shape) != tuple(spec.shape) or out.dtype != dtype or not out.is_contiguous() or out.device != dev:
        raise CodecError(f"tensor {spec.name!r}: 'out' must be a contiguous {dtype} tensor of shape "
                         f"{list(spec.shape)} on {dev}, got {out.dtype} {list(out.shape)} on {out.device}")
    if m * n == 0:
        return out
    prefix = _prefix(f["depth"], r, n)
    seg, sst = _offsets(counts, g)
    bi = _tile_rows(g)
    bj = CHUNK  # [32 columns x 64 rows] per step: ~136 registers at 4 warps on sm_90 (64 columns: 217)
    grid = (r, triton.cdiv(n, bj))
    _decode_kernel[grid](out, f["codes"], f["depth"], f["loc"], f["scale"], prefix, _level_table(dev), m, n, g,
                         triton.cdiv(n, CHUNK), f["codes"].numel(), f["scale"].numel(), *seg, *sst,
                         BJ=bj, BI=bi, CH=CHUNK, num_warps=4)
    return out


_PLANES = {1: ((1, 0),), 2: ((2, 0),), 3: ((2, 0), (1, 2)), 4: ((4, 0),), 5: ((4, 0), (1, 4)),
           6: ((4, 0), (2, 4)), 7: ((4, 0), (2, 4), (1, 6)), 8: ((4, 0), (4, 4))}  # depth -> (width, bit offset)
_UNIT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # plane width -> unit type (8 codes)


@dataclass(frozen=True)
class CvxqFusedWeight:
    """A cvxq weight kept compressed on the device for ``matmul``, repacked once by ``prepare`` into
    depth-uniform classes: in each row block the columns are sorted by depth (``perm``), and the
    codes of class (block r, depth b) are split into planes of 4/2/1 bits (``_PLANES``), each an
    array ``[GU, C]`` of units (8 consecutive rows of a group, ``GU = ceil(G/8)``; ``C`` = columns
    of the class, consecutive columns at consecutive addresses). Same code bits as the payload (+
    row padding to 8); per group a 16-bit column index replaces the 4-bit depth; 4.32 bits/weight
    for a 4.25 bpw payload at G = 192."""

    perm: Tensor  # [R, n] int16 (int32 when n > 32767): column of each sorted position
    cs: Tensor  # [R, 10] int32: sorted position where depth class b starts (cs[:, 9] = n)
    ts: Tensor  # [R, 10] int32: matmul tile (TILE_COLS columns, one class each) where class b starts
    cbase: Tensor  # [R, 8, 3] int64: first unit of class (r, b = 1..8)'s planes in p1/p2/p4
    p1: Tensor  # [units] uint8: 1-bit planes (8 codes a unit)
    p2: Tensor  # [units] int16: 2-bit planes
    p4: Tensor  # [units] int32: 4-bit planes
    scale: Tensor  # [R, n] float16, sorted order (0 for depth 0)
    loc: Tensor  # [R, n] float16, sorted order
    levels: Tensor  # [9 * 256] float32, shared by every weight on the device
    m: int
    n: int
    g: int
    r: int
    tiles: int  # max over row blocks of ts[r, 9]
    name: str

    @property
    def nbytes(self) -> int:
        """Resident bytes of this weight (the shared 9 KB level table not counted)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.perm, self.cs, self.ts, self.cbase, self.p1, self.p2, self.p4, self.scale, self.loc))

    @property
    def bits_per_weight(self) -> float:
        """Resident bits per weight."""
        return 8 * self.nbytes / max(1, self.m * self.n)


def prepare(enc: Encoded, spec: TensorSpec) -> CvxqFusedWeight:
    """Repack a payload (on its device) for ``matmul``: checks the depths against ``counts`` once
    (host syncs are fine at load), sorts each row block's columns by depth and regroups the codes of
    each (row block, depth) class into byte-aligned planes read 8 codes per load."""
    if len(spec.shape) != 2:
        raise CodecError(f"tensor {spec.name!r}: the cvxq matmul needs a 2-D weight, got {list(spec.shape)}")
    dev = enc.fields["loc"].device
    f = Cvxq.checked_fields(enc, spec, dev)
    counts = enc.params["counts"]
    m, n, g, r = group_layout(tuple(spec.shape), enc.params["group_rows"])
    k = r * n
    depth = unpack_codes(f["depth"], 4, k).long() if k else torch.zeros(0, dtype=torch.long, device=dev)
    hist = torch.bincount(depth, minlength=16).tolist()
    if hist[: MAX_DEPTH + 1] != list(counts) or any(hist[MAX_DEPTH + 1:]):
        raise CorruptPayloadError(
            f"tensor {spec.name!r}: codec 'cvxq' group depths {hist} do not match the index's counts "
            f"{list(counts)}; the file is damaged or was not written by thawed")
    seg, _ = _offsets(counts, g)
    kk = torch.arange(k, device=dev)
    rr, jj = kk // n, kk % n
    order = torch.argsort(rr * (9 * n) + depth * n + jj)  # per block: by depth, then column
    pos = torch.empty_like(order)
    pos[order] = kk
    scale = torch.zeros(k, dtype=torch.float16, device=dev)
    scale[torch.argsort(depth, stable=True)[counts[0]:]] = f["scale"]  # depth-sorted -> natural
    cnt = torch.bincount(rr * 9 + depth, minlength=r * 9).view(r, 9)
    cs = torch.zeros((r, 10), dtype=torch.int32, device=dev)
    cs[:, 1:] = torch.cumsum(cnt, 1)
    ts = torch.zeros((r, 10), dtype=torch.int32, device=dev)
    ts[:, 1:] = torch.cumsum(-(-cnt // TILE_COLS), 1)
    cnt_h = cnt.cpu()
    gu = -(-g // 8)
    cbase = torch.zeros((r, 8, 3), dtype=torch.int64)
    chunks: dict[int, list[Tensor]] = {1: [], 2: [], 4: []}
    fill = {1: 0, 2: 0, 4: 0}
    for b in range(1, MAX_DEPTH + 1):
        c = counts[b]
        if not c:
            continue
        start = seg[b - 1] // 8
        q = unpack_codes(f["codes"][start: start + packed_nbytes(c * g, b)], b, c * g).view(c, g).long()
        q = F.pad(q, (0, gu * 8 - g)).view(c, gu, 8)  # groups of depth b in increasing k: classes in block order
        cr = cnt_h[:, b]
        cstart = torch.cumsum(cr, 0) - cr  # [R] first group of each class in this depth's list
        kb = torch.nonzero(depth == b).squeeze(1)
        rb = kb // n
        cg = cr.to(dev)[rb]
        rank = torch.arange(c, device=dev) - cstart.to(dev)[rb]
        dest = (gu * cstart.to(dev)[rb])[:, None] + torch.arange(gu, device=dev)[None, :] * cg[:, None] + rank[:, None]
        for e, (wd, o) in enumerate(_PLANES[b]):
            v = ((q >> o) & ((1 << wd) - 1)) << (torch.arange(8, device=dev) * wd)
            unit = torch.empty(c * gu, dtype=torch.int64, device=dev)
            unit[dest.reshape(-1)] = v.sum(-1).reshape(-1)
            chunks[wd].append(unit)
            cbase[:, b - 1, e] = fill[wd] + gu * cstart
            fill[wd] += c * gu
    planes = {}
    for wd, parts in chunks.items():
        v = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.int64, device=dev)
        top = 1 << (8 * wd)  # units are 8*wd bits: two's complement for the signed types
        planes[wd] = (v if wd == 1 else torch.where(v >= top // 2, v - top, v)).to(_UNIT[wd])
    pdt = torch.int16 if n <= 32767 else torch.int32
    return CvxqFusedWeight(jj[order].to(pdt).view(r, n).contiguous(), cs, ts, cbase.to(dev), planes[1], planes[2],
                           planes[4], scale[order].view(r, n).contiguous(),
                           f["loc"].reshape(-1)[order].view(r, n).contiguous(), _level_table(dev), m, n, g, r,
                           int(ts[:, 9].max()) if r else 0, spec.name)


def _split(row_tiles: int, col_tiles: int, target: int) -> tuple[int, int]:
    """(splits, column tiles per split): about ``target`` programs, no empty split."""
    want = max(1, min(col_tiles, -(-target // row_tiles)))
    per = -(-col_tiles // want)
    return -(-col_tiles // per), per


def _args(w: CvxqFusedWeight) -> tuple:
    """The prepared tensors in the kernels' argument order (``ts`` apart: the matmul only)."""
    return (w.perm, w.cs, w.cbase, w.p1, w.p2, w.p4, w.scale, w.loc, w.levels)


def _decode_packed(w: CvxqFusedWeight, dtype: torch.dtype) -> Tensor:
    out = torch.empty((w.m, w.n), dtype=dtype, device=w.perm.device)
    bj, bi = 32, _tile_rows(w.g)
    _packed_decode_kernel[(w.r * triton.cdiv(w.g, bi), triton.cdiv(w.n, bj))](
        out, *_args(w), w.m, w.n, w.g, triton.cdiv(w.g, 8), BJ=bj, BI=bi, num_warps=4)
    return out


def matmul(x: Tensor, w: CvxqFusedWeight, *, programs: int | None = None) -> Tensor:
    """``x @ W^T``: x [..., n] in bfloat16/float16/float32 -> [..., m] in x's dtype (no bias).

    At most ``MAX_FUSED_ROWS`` rows: one fused kernel (fp32 accumulation, split-K partial sums);
    more rows (or several fp32 rows): the weight is decoded into a temporary and ``F.linear`` runs.
    ``programs``: the split-K target (default ``_TARGET_PROGRAMS_GEMV`` for one row,
    ``_TARGET_PROGRAMS`` for more; gpu_bench.py's sweep passes others)."""
    if programs is not None and programs < 1:
        raise CodecError(f"tensor {w.name!r}: matmul programs must be >= 1, got {programs}")
    if x.shape[-1] != w.n:
        raise CodecError(f"tensor {w.name!r}: matmul input has {x.shape[-1]} features, the weight takes {w.n}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CodecError(f"tensor {w.name!r}: matmul input must be float32/bfloat16/float16, got {x.dtype}")
    if x.device != w.perm.device:
        raise CodecError(f"tensor {w.name!r}: matmul input is on {x.device}, the weight on {w.perm.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.n).contiguous()
    rows = x2.shape[0]
    if rows > MAX_FUSED_ROWS or (rows > 1 and x.dtype == torch.float32) or rows == 0 or w.m * w.n == 0:
        if w.m * w.n == 0:
            return x2.new_zeros((rows, w.m)).reshape(*lead, w.m)
        return F.linear(x2, _decode_packed(w, x.dtype)).reshape(*lead, w.m)
    # Tile [BI rows (64 for G = 192: three per block, none wasted), 32 sorted columns], 4 warps:
    # 16 weights per thread, two plane loads at most per 8 weights.
    bi = _tile_rows(w.g)
    row_tiles = w.r * triton.cdiv(w.g, bi)
    if programs is None:
        programs = _TARGET_PROGRAMS_GEMV if rows == 1 else _TARGET_PROGRAMS
    splits, per = _split(row_tiles, w.tiles, programs)
    part = torch.empty((splits, rows, w.m), dtype=torch.float32, device=x.device)
    _matmul_kernel[(row_tiles, splits)](
        x2, part, w.perm, w.cs, w.ts, *_args(w)[2:], rows, w.m, w.n, w.g, triton.cdiv(w.g, 8), per,
        BM=16, BJ=TILE_COLS, BI=bi, USE_DOT=rows > 1, DOT_F32=interpreting(), num_warps=4)
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(x.dtype).reshape(*lead, w.m)
