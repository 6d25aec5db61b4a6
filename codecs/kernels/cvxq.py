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

    prefix: [R * NC, 9] int32        # _hist_kernel (one launch) + torch.cumsum, per call

A program takes one row block x ``BJ = 32`` columns: it derives its groups' state once (in-tile
exclusive count by ``tl.cumsum`` over [BJ, 16] one-hot depths + the previous chunk's row), then
walks the block's ``G`` rows ``BI`` at a time (64 for G = 192: no waste).

``prepare`` / ``matmul`` (at most 16 rows): ``prepare`` repacks once, on the device, each group's
bit offset and scale in natural order (``off: [R, n] int32``, ``scale: [R, n] f16``), so a tile's
groups cost four coalesced loads; resident 4.25 -> ~4.42 bits/weight at G = 192. A program takes
``BI`` rows (the whole row block when G <= 256) and a split of the columns, 16 at a time; fp32
partial sums per split are added by one ``torch.sum``.

Tile layout ``[NREP, BJ, 32]``: the 32 lanes of a warp run along 32 consecutive rows of a group
(consecutive codes: the same bytes), the warps along the columns, and each thread repeats over
``NREP = BI / 32`` row slices of the same groups. A code is ``(b0 | b1 << 8) >> (bit & 7) & (2**b - 1)``
(``b1`` loaded only for a code that crosses a byte); its level comes from the ``[9, 256]`` float32
table (9 KB, L1-resident); ``w = level * scale + loc`` (depth 0 reads no code: level and scale 0,
so ``w = loc``). ``decode`` stores the tile row-major (Triton converts the layout through shared
memory: 16-byte stores along ``n``); ``matmul`` multiplies it right away (one row: elementwise fp32
FMAs reduced once at the end; 2..16 rows: ``tl.dot`` with M padded to 16).

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
_TARGET_PROGRAMS = 132 * 4  # H200: 132 SMs, about 4 programs each
_SCALARS = ["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"]
_LEVELS: dict[torch.device, Tensor] = {}


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _hist_kernel(depth_ptr, hist_ptr, T, NC, n, HB: tl.constexpr, CH: tl.constexpr):
    """hist[t, b] (t < T = R*NC, b < 9) = groups of depth b among chunk t's columns."""
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
        tl.store(hist_ptr + t * 9 + b, cnt, mask=t < T)


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
def _groups(codes_ptr, depth_ptr, loc_ptr, scale_ptr, prefix_ptr, lv_ptr, seg, sst, r, j0, n, G, NC, nbytes,
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
    pre = tl.load(prefix_ptr + (t - 1).to(tl.int64) * 9 + bins, mask=bins < tl.where((t > 0) & (j0 < n), 9, 0), other=0)
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
                                             r, j0, n, G, NC, nbytes, nscale, BJ, CH)
    j = (j0 + tl.arange(0, BJ))[None, :, None]
    base = tl.arange(0, BI // 32)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]  # [NREP, 1, 32]
    for i0 in range(0, G, BI):
        i = i0 + base
        row = r * G + i
        i_ok = (i < G) & (row < m)
        w = _codes(d, gp, gsh, coded, sc, lo, lvp, i, i_ok)
        tl.store(out_ptr + (row.to(tl.int64) * n + j), w.to(out_ptr.dtype.element_ty), mask=(j < n) & i_ok)


@triton.jit
def _groups_packed(codes_ptr, depth_ptr, off_ptr, scale_ptr, loc_ptr, lv_ptr, r, j0, n, BJ: tl.constexpr):
    """``_groups`` from ``prepare``'s layout: each group's bit offset and scale stored in natural
    order, so a group costs four coalesced loads and no rank computation."""
    j = j0 + tl.arange(0, BJ)
    j_ok = j < n
    k = r.to(tl.int64) * n + j
    dbyte = tl.load(depth_ptr + (k >> 1), mask=j_ok, other=0).to(tl.int32)
    d = tl.where(j_ok, (dbyte >> ((k & 1) * 4).to(tl.int32)) & 15, 0)  # checked by prepare: <= 8
    gbit = tl.load(off_ptr + k, mask=j_ok, other=0)
    sc = tl.load(scale_ptr + k, mask=j_ok, other=0.0).to(tl.float32)
    lo = tl.load(loc_ptr + k, mask=j_ok, other=0.0).to(tl.float32)
    return (d[None, :, None], (codes_ptr + (gbit >> 3))[None, :, None], (gbit & 7).to(tl.int32)[None, :, None],
            (d > 0)[None, :, None], sc[None, :, None], lo[None, :, None], (lv_ptr + d * 256)[None, :, None])


@triton.jit
def _packed_decode_kernel(out_ptr, codes_ptr, depth_ptr, off_ptr, scale_ptr, loc_ptr, lv_ptr, m, n, G,
                          BJ: tl.constexpr, BI: tl.constexpr):
    """``_decode_kernel`` over ``prepare``'s layout (the matmul's path for more than 16 rows)."""
    r = tl.program_id(0)
    j0 = tl.program_id(1) * BJ
    d, gp, gsh, coded, sc, lo, lvp = _groups_packed(codes_ptr, depth_ptr, off_ptr, scale_ptr, loc_ptr, lv_ptr, r, j0,
                                                    n, BJ)
    j = (j0 + tl.arange(0, BJ))[None, :, None]
    base = tl.arange(0, BI // 32)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    for i0 in range(0, G, BI):
        i = i0 + base
        row = r * G + i
        i_ok = (i < G) & (row < m)
        w = _codes(d, gp, gsh, coded, sc, lo, lvp, i, i_ok)
        tl.store(out_ptr + (row.to(tl.int64) * n + j), w.to(out_ptr.dtype.element_ty), mask=(j < n) & i_ok)


@triton.jit
def _matmul_kernel(x_ptr, part_ptr, codes_ptr, depth_ptr, off_ptr, scale_ptr, loc_ptr, lv_ptr, M, m, n, G, JB_PER,
                   BM: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr, USE_DOT: tl.constexpr,
                   DOT_F32: tl.constexpr):
    """part[s, :M, rows] = x[:M, cols_s] @ W[rows, cols_s]^T for split s (columns JB_PER*BJ wide);
    a program's rows are BI rows of one row block (BI >= G up to 256: the whole block)."""
    rt = tl.program_id(0)
    s = tl.program_id(1)
    nib = (G + BI - 1) // BI
    r = rt // nib
    i = (rt % nib) * BI + tl.arange(0, BI // 32)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    i_ok = (i < G) & (r * G + i < m)
    xm = tl.arange(0, BM)
    if USE_DOT:
        acc = tl.zeros([BM, BI], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BI // 32, BJ, 32], dtype=tl.float32)
    for tt in range(0, JB_PER):
        j0 = (s * JB_PER + tt) * BJ
        d, gp, gsh, coded, sc, lo, lvp = _groups_packed(codes_ptr, depth_ptr, off_ptr, scale_ptr, loc_ptr, lv_ptr, r,
                                                        j0, n, BJ)
        w = _codes(d, gp, gsh, coded, sc, lo, lvp, i, i_ok).to(x_ptr.dtype.element_ty)  # as F.linear sees it
        j = j0 + tl.arange(0, BJ)
        if USE_DOT:
            w2 = tl.reshape(tl.permute(w, (1, 0, 2)), (BJ, BI))  # [BJ, BI], row index rep*32 + lane
            xt = tl.load(x_ptr + xm[:, None] * n + j[None, :], mask=(xm < M)[:, None] & (j < n)[None, :], other=0.0)
            if DOT_F32:  # Triton's interpreter multiplies bf16 operands wrongly; same products in fp32
                acc += tl.dot(xt.to(tl.float32), w2.to(tl.float32))
            else:
                acc += tl.dot(xt, w2)
        else:
            xv = tl.load(x_ptr + j, mask=j < n, other=0.0).to(tl.float32)
            acc3 += w.to(tl.float32) * xv[None, :, None]
    if USE_DOT:
        i2 = (rt % nib) * BI + tl.arange(0, BI)
        row2 = r * G + i2
        offs = (s * M + xm)[:, None].to(tl.int64) * m + row2[None, :]
        tl.store(part_ptr + offs, acc, mask=(xm < M)[:, None] & ((i2 < G) & (row2 < m))[None, :])
    else:
        y = tl.sum(acc3, 1)  # [NREP, 32]
        row = tl.reshape(r * G + i, (BI // 32, 32))
        tl.store(part_ptr + s.to(tl.int64) * m + row, y, mask=tl.reshape(i_ok, (BI // 32, 32)))


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
    """[R * NC, 9] int32 inclusive per-depth counts by chunk (one Triton launch + one cumsum)."""
    nc = triton.cdiv(n, CHUNK)
    t = r * nc
    hist = torch.empty((t, 9), dtype=torch.int32, device=depth.device)
    hb = 32
    _hist_kernel[(triton.cdiv(t, hb),)](depth, hist, t, nc, n, HB=hb, CH=CHUNK)
    return torch.cumsum(hist, 0, dtype=torch.int32)


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


@dataclass(frozen=True)
class CvxqFusedWeight:
    """A cvxq weight kept compressed on the device for ``matmul``, repacked once by ``prepare``:
    the codes and depths as stored, and per group (natural order) its bit offset and scale next to
    its location. Versus the payload: + the offsets (32 bits per group; 64 past 2**31 code bits),
    - the prefix work; 4.25 -> ~4.42 bits/weight at G = 192."""

    codes: Tensor  # [sum_b ceil(c_b*G/8)*b] uint8, the payload's segments
    depth: Tensor  # [ceil(K/8)*4] uint8, 4-bit depths in natural order
    off: Tensor  # [R, n] int32 (int64 for > 2**31 code bits): bit of each group's first code
    scale: Tensor  # [R, n] float16, natural order (0 for depth 0)
    loc: Tensor  # [R, n] float16
    levels: Tensor  # [9 * 256] float32, shared by every weight on the device
    m: int
    n: int
    g: int
    r: int
    name: str

    @property
    def nbytes(self) -> int:
        """Resident bytes of this weight (the shared 9 KB level table not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.depth, self.off, self.scale, self.loc))


def prepare(enc: Encoded, spec: TensorSpec) -> CvxqFusedWeight:
    """Repack a payload (on its device) for ``matmul``: checks the depths against ``counts`` once
    (host syncs are fine at load) and stores each group's bit offset and scale in natural order."""
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
    seg, sst = _offsets(counts, g)
    first = torch.tensor([0] + [counts[0] + x for x in sst], dtype=torch.long, device=dev)  # sorted start per depth
    order = torch.argsort(depth, stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(k, device=dev)
    rank = pos - first[depth]
    seg_t = torch.tensor([0] + seg, dtype=torch.long, device=dev)
    off = seg_t[depth] + rank * g * depth
    big = f["codes"].numel() * 8 >= 2**31
    scale = torch.cat([torch.zeros(1, dtype=torch.float16, device=dev), f["scale"]])
    scale_nat = scale[torch.where(depth > 0, pos - counts[0] + 1, 0)]
    return CvxqFusedWeight(f["codes"], f["depth"], off.to(torch.int64 if big else torch.int32).view(r, n).contiguous(),
                           scale_nat.view(r, n).contiguous(), f["loc"], _level_table(dev), m, n, g, r, spec.name)


def _split(row_tiles: int, col_tiles: int) -> tuple[int, int]:
    """(splits, column tiles per split): enough programs to fill the GPU, no empty split."""
    want = max(1, min(col_tiles, -(-_TARGET_PROGRAMS // row_tiles)))
    per = -(-col_tiles // want)
    return -(-col_tiles // per), per


def _decode_packed(w: CvxqFusedWeight, dtype: torch.dtype) -> Tensor:
    out = torch.empty((w.m, w.n), dtype=dtype, device=w.codes.device)
    bj = 32
    _packed_decode_kernel[(w.r, triton.cdiv(w.n, bj))](out, w.codes, w.depth, w.off, w.scale, w.loc, w.levels, w.m,
                                                       w.n, w.g, BJ=bj, BI=_tile_rows(w.g), num_warps=4)
    return out


def matmul(x: Tensor, w: CvxqFusedWeight) -> Tensor:
    """``x @ W^T``: x [..., n] in bfloat16/float16/float32 -> [..., m] in x's dtype (no bias).

    At most ``MAX_FUSED_ROWS`` rows: one fused kernel (fp32 accumulation, split-K partial sums);
    more rows (or several fp32 rows): the weight is decoded into a temporary and ``F.linear`` runs."""
    if x.shape[-1] != w.n:
        raise CodecError(f"tensor {w.name!r}: matmul input has {x.shape[-1]} features, the weight takes {w.n}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CodecError(f"tensor {w.name!r}: matmul input must be float32/bfloat16/float16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.n).contiguous()
    rows = x2.shape[0]
    if rows > MAX_FUSED_ROWS or (rows > 1 and x.dtype == torch.float32) or rows == 0 or w.m * w.n == 0:
        if w.m * w.n == 0:
            return x2.new_zeros((rows, w.m)).reshape(*lead, w.m)
        return F.linear(x2, _decode_packed(w, x.dtype)).reshape(*lead, w.m)
    # Tile [BI rows, 16 columns], 8 warps: the whole row block when G <= 256 (each group's state is
    # loaded once per program), 16 weights per thread, ~92 registers (sm_90, two programs per SM).
    bi = min(256, max(32, triton.next_power_of_2(w.g)))
    bj = 16
    row_tiles = w.r * triton.cdiv(w.g, bi)
    splits, per = _split(row_tiles, triton.cdiv(w.n, bj))
    part = torch.empty((splits, rows, w.m), dtype=torch.float32, device=x.device)
    _matmul_kernel[(row_tiles, splits)](
        x2, part, w.codes, w.depth, w.off, w.scale, w.loc, w.levels, rows, w.m, w.n, w.g, per,
        BM=16, BJ=bj, BI=bi, USE_DOT=rows > 1, DOT_F32=interpreting(), num_warps=8 if bi >= 256 else 4)
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(x.dtype).reshape(*lead, w.m)
