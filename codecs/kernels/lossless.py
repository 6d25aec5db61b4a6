"""Triton decode of ``lossless`` in one pass: rANS exponent lanes fused with the float assembly.

Each program owns ``BLOCK`` lanes of the exponent stream (``kernels.rans``); at step ``t`` lane
``j`` decodes the exponent of element ``i = j + t * lanes``, loads its raw bytes (contiguous across
the block), assembles the bits and stores element ``i`` of the output in the requested dtype. The
exponents never go through memory. Bytes per element: the raw planes (3 for float32, 1 for
bfloat16, 1 + 3/8 for float16), ~2-3 bits of exponent words, the output (2 or 4).

Same dtype as the source: the bits are stored through an integer view of ``out`` (bit for bit,
NaN payloads included). Another dtype: the value goes through float32 (exact) and is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..base import Encoded, SharedState, TensorSpec
from ..errors import CodecError
from ..lossless import Lossless, _layout
from . import rans as krans
from .rans import lane_init, rans_step

__all__ = ["decode"]

_SRC = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@triton.jit
def _store_value(ptrs, v, mask, OUT: tl.constexpr):
    """Store float32 values ``v`` rounded once to the output: OUT 1 bfloat16 bits (round to nearest
    even, NaN -> 0x7FC0 as torch; by hand so that every backend rounds alike), OUT 2 ``.to``."""
    if OUT == 1:
        u = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(ptrs, r.to(tl.int32).to(tl.int16), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _lossless_kernel(states_ptr, words_ptr, start_ptr, lw_ptr, slot_ptr, rest_ptr, hi_ptr, out_ptr, err_ptr,
                     n, lanes, steps, n_words,
                     K: tl.constexpr, SRC: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr,
                     IDX64: tl.constexpr):
    # rest: [3, n] (SRC 0) | [n] uint8; hi: [ceil(n/8)*3] uint8 (SRC 2, pack_bits 3-bit codes)
    # out: [n]; OUT 0: the source dtype's int32/int16 view (bits stored as they are); 1: bfloat16's
    # int16 view (value rounded to nearest even by hand, as torch does); 2: float32 / float16
    pid = tl.program_id(0)
    lane, lm, x, ptr, end = lane_init(states_ptr, start_ptr, lw_ptr, pid, lanes, BLOCK, IDX64)
    i = lane
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    for _t in range(steps):
        active = lm & (i < n)
        e, x, ptr = rans_step(x, ptr, active, slot_ptr, zero, words_ptr, n_words, K)
        r0 = tl.load(rest_ptr + i, mask=active, other=0).to(tl.int32)
        if SRC == 0:
            r1 = tl.load(rest_ptr + n + i, mask=active, other=0).to(tl.int32)
            r2 = tl.load(rest_ptr + 2 * n + i, mask=active, other=0).to(tl.int32)
            bits = ((r2 >> 7) << 31) | (e << 23) | ((r2 & 0x7F) << 16) | (r1 << 8) | r0
            if OUT == 0:
                tl.store(out_ptr + i, bits, mask=active)
            else:
                _store_value(out_ptr + i, bits.to(tl.float32, bitcast=True), active, OUT)
        elif SRC == 1:
            bits = ((r0 >> 7) << 15) | (e << 7) | (r0 & 0x7F)  # 16-bit pattern in an int32
            if OUT == 0:
                tl.store(out_ptr + i, bits.to(tl.int16), mask=active)
            else:
                _store_value(out_ptr + i, (bits << 16).to(tl.float32, bitcast=True), active, OUT)
        else:
            g = (i // 8) * 3
            b0 = tl.load(hi_ptr + g, mask=active, other=0).to(tl.int32)
            b1 = tl.load(hi_ptr + g + 1, mask=active, other=0).to(tl.int32)
            b2 = tl.load(hi_ptr + g + 2, mask=active, other=0).to(tl.int32)
            hi = ((b0 | (b1 << 8) | (b2 << 16)) >> ((i % 8).to(tl.int32) * 3)) & 7
            bits = ((hi >> 2) << 15) | (e << 10) | ((hi & 3) << 8) | r0
            b16 = bits.to(tl.int16)
            if OUT == 0:
                tl.store(out_ptr + i, b16, mask=active)
            else:
                _store_value(out_ptr + i, b16.to(tl.float16, bitcast=True).to(tl.float32), active, OUT)
        i += lanes
    bad = lm & ((x != 65536) | (ptr != end))
    tl.store(err_ptr + pid, tl.sum(bad.to(tl.int32), axis=0))



def decode(enc: Encoded, spec: TensorSpec, dtype: torch.dtype, out: Tensor | None = None,
           shared: SharedState | None = None, check: bool = True) -> Tensor:
    """``Lossless.decode`` on the payload's device in one kernel -> ``spec.shape`` in ``dtype``.

    ``out``: a contiguous ``spec.shape`` tensor of ``dtype`` on the device, written and returned.
    ``check=True`` syncs once and raises ``CorruptPayloadError`` naming the tensor (as the reference
    does); ``check=False`` is sync-free (CUDA-graph capturable) for already validated payloads.
    """
    if dtype not in _SRC:
        raise CodecError(f"tensor {spec.name!r}: lossless kernel outputs float32, bfloat16 or float16, not {dtype}")
    dev = enc.fields["exp_states"].device if "exp_states" in enc.fields else torch.device("cpu")  # else: checked below
    f = Lossless.checked_fields(enc, spec, dev)
    _layout(spec)
    p = enc.params
    n, k = p["n"], p["precision_bits"]
    what = f"tensor {spec.name!r} exponents"
    states, words, lw = f["exp_states"], f["exp_words"], f["exp_lane_words"]
    krans.check_stream_args(states, words, lw, k, n, what)
    if out is None:
        out = torch.empty(spec.shape, dtype=dtype, device=dev)
    elif out.dtype != dtype or tuple(out.shape) != tuple(spec.shape) or not out.is_contiguous() or out.device != dev:
        raise CodecError(f"tensor {spec.name!r}: out must be a contiguous {dtype} {list(spec.shape)} tensor on {dev}")
    if n == 0:
        return out
    freq = f["exp_freq"].view(1, -1)
    slot = krans.slot_table(freq, k)
    lanes = states.numel()
    steps = -(-n // lanes)
    block, warps = krans.launch_config(lanes)
    grid = (triton.cdiv(lanes, block),)
    err = torch.empty(grid[0], dtype=torch.int32, device=dev)
    mode = 0 if dtype == spec.dtype else 1 if dtype == torch.bfloat16 else 2
    dst = out.view(_BITS_VIEW[dtype]) if mode < 2 else out
    hi = f.get("rest_hi", f["rest"])
    _lossless_kernel[grid](states, krans._nonempty(words), krans.lane_starts(lw), lw, slot, f["rest"], hi, dst, err,
                           n, lanes, steps, words.numel(),
                           K=k, SRC=_SRC[spec.dtype], OUT=mode, BLOCK=block,
                           IDX64=krans.index_is_64bit(3 * n, lanes), num_warps=warps)  # fp32 planes: 3n
    if check:
        counts = krans.error_counts(states, lw, err, krans.table_errors(freq, k))
        krans.raise_if_corrupt(counts, words.numel(), lanes, k, what)
    return out
