"""Triton interleaved-rANS lane decoder (``thawed.codecs.rans`` conventions) for ``lossless`` and ``nwc``.

One Triton "row" per lane: a program owns ``BLOCK`` consecutive lanes and loops over the steps;
at step ``t`` lane ``j`` decodes symbol ``j + t * lanes``, so the stores of a block are contiguous.
A step is one gather from a small per-slot table (kept in L1/L2), one 16-bit word read from the
lane's own contiguous words (when the state falls below ``L``), and a few integer ops.

Slot table (built on the device in one launch, sync-free, by ``slot_table``)::

    slot: [U * M] int64      # freq | (slot - cum[sym]) << 16 | sym << 32, M = 2**precision_bits

Every read is masked into bounds, so a damaged payload cannot make the kernel fault: it only
produces wrong symbols and a nonzero error count. The integrity check of ``rans.decode`` (every
lane ends at ``L`` having read exactly its words; tables sum to ``M``; counts add up) is one host
sync after the kernel when ``check=True``; ``check=False`` is sync-free (CUDA-graph capturable).

Public API: ``decode_symbols`` (symbols as uint8); for fused consumers (``kernels.lossless``):
the ``@triton.jit`` helpers ``lane_init`` and ``rans_step`` called inside their own step loop, and
``slot_table``, ``lane_starts``, ``launch_config``, ``index_is_64bit``, ``check_stream_args``,
``error_counts``, ``table_errors``, ``raise_if_corrupt`` on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import rans
from ..errors import CodecError, CorruptPayloadError

__all__ = ["slot_table", "slot_table_reference", "lane_starts", "launch_config", "raise_if_corrupt", "decode_symbols",
           "rans_step", "table_errors", "lane_init", "index_is_64bit", "check_stream_args", "error_counts"]

RANS_L = rans.RANS_L


def slot_table_reference(rows: Tensor, precision_bits: int) -> Tensor:
    """Frequency rows [U, A] (any integer dtype, on the device) -> packed slot table [U * M] int64
    (pure PyTorch: ``searchsorted``; ``slot_table`` is the one-launch kernel, tested equal).

    Entry ``u * M + s`` holds the symbol ``c`` with ``cum[c] <= s < cum[c] + f[c]`` in row ``u`` and
    ``f | (s - cum[c]) << 16 | sym << 32`` (``f <= 2**15``, ``s - cum[c] < 2**15``: the low 32 bits
    are all the state update needs). In bounds for any row, valid or not (``table_errors`` tells).
    """
    m = 1 << precision_bits
    f = rows.to(torch.int64)
    u, a = f.shape
    incl = torch.cumsum(f, 1)  # [U, A]
    slots = torch.arange(m, device=f.device, dtype=torch.int64).expand(u, m).contiguous()
    sym = torch.searchsorted(incl, slots, right=True).clamp_(0, a - 1)  # [U, M]
    fs = torch.gather(f, 1, sym)
    bias = slots - (torch.gather(incl, 1, sym) - fs)
    return ((fs & 0xFFFF) | ((bias & 0x7FFF) << 16) | (sym << 32)).reshape(-1).contiguous()


@triton.jit
def _slot_kernel(freq_ptr, slot_ptr, A, K: tl.constexpr, A_POW2: tl.constexpr, S: tl.constexpr):
    # freq: [U, A] int (contiguous); slot: [U * 2**K] int64; program = S slots of one row
    pid = tl.program_id(0)
    per_row = (1 << K) // S
    row = pid // per_row
    s = (pid % per_row) * S + tl.arange(0, S)
    a = tl.arange(0, A_POW2)
    f = tl.load(freq_ptr + row * A + a, mask=a < A, other=0).to(tl.int32)
    incl = tl.cumsum(f, 0)
    sym = tl.sum((incl[None, :] <= s[:, None]).to(tl.int32), 1)  # = searchsorted(incl, s, right=True)
    sym = tl.minimum(sym, A - 1)
    fs = tl.sum(tl.where(a[None, :] == sym[:, None], f[None, :], 0), 1)
    cum = tl.sum(tl.where(a[None, :] < sym[:, None], f[None, :], 0), 1)
    bias = s - cum
    e = (fs & 0xFFFF).to(tl.int64) | ((bias & 0x7FFF).to(tl.int64) << 16) | (sym.to(tl.int64) << 32)
    tl.store(slot_ptr + row.to(tl.int64) * (1 << K) + s, e)


def slot_table(rows: Tensor, precision_bits: int, use_kernel: bool | None = None) -> Tensor:
    """``slot_table_reference`` in one kernel launch (rows [U, A] -> [U * M] int64, sync-free);
    ``use_kernel`` default: on CUDA (the interpreter would take a program per 32 slots: slow)."""
    k = precision_bits
    if use_kernel is None:
        use_kernel = rows.device.type == "cuda"
    if not use_kernel:
        return slot_table_reference(rows, k)
    f = rows.contiguous()
    u, a = f.shape
    out = torch.empty(u << k, dtype=torch.int64, device=f.device)
    s = 32
    _slot_kernel[(u * ((1 << k) // s),)](f, out, a, K=k, A_POW2=triton.next_power_of_2(a), S=s, num_warps=4)
    return out


def table_errors(rows: Tensor, precision_bits: int) -> Tensor:
    """Device scalar: rows not summing to ``2**precision_bits`` plus negative entries (0 = valid)."""
    f = rows.to(torch.int64)
    return (f.sum(1) != (1 << precision_bits)).sum() + (f < 0).sum()


def lane_starts(lane_words: Tensor) -> Tensor:
    """[lanes] int32 word counts -> [lanes] int32 index of each lane's first word (exclusive cumsum;
    a damaged stream may wrap, the kernel masks every read and the check reports it)."""
    return torch.cumsum(lane_words, 0, dtype=torch.int32) - lane_words


def index_is_64bit(n: int, lanes: int) -> bool:
    """Whether element indices (up to ``n + lanes``) need int64 in the kernels."""
    return n + 2 * lanes >= 1 << 31


def launch_config(lanes: int) -> tuple[int, int]:
    """(BLOCK lanes per program, num_warps): one lane per thread; small blocks so that even a few
    thousand lanes spread over all SMs (the work per lane is a serial chain of dependent loads)."""
    if lanes >= 64 * 132 * 4:
        return 64, 2
    return 32, 1


@triton.jit
def rans_step(x, ptr, active, slot_ptr, slot_base, words_ptr, n_words, K: tl.constexpr):
    """One decode step of a block of lanes -> (symbol int32, new state, new word pointer).

    ``x`` uint32 states in [L, 2**32), ``ptr`` int32 next-word index, ``active`` lanes that decode a
    symbol at this step, ``slot_base`` ``table * M``. Inactive lanes keep state and pointer. The
    state arithmetic is 32-bit (wraps only for a damaged table, which the check reports).
    """
    e = tl.load(slot_ptr + slot_base + (x & ((1 << K) - 1)), mask=active, other=0)  # int64 entry
    lo = e.to(tl.uint32)  # freq | bias << 16
    sym = (e >> 32).to(tl.int32)
    xn = (lo & 0xFFFF) * (x >> K) + (lo >> 16)
    need = active & (xn < 65536)
    w = tl.load(words_ptr + ptr, mask=need & (ptr >= 0) & (ptr < n_words), other=0).to(tl.int32) & 0xFFFF
    xn = tl.where(need, (xn << 16) | w.to(tl.uint32), xn)
    x = tl.where(active, xn, x)
    ptr = ptr + need.to(tl.int32)
    return sym, x, ptr


@triton.jit
def lane_init(states_ptr, start_ptr, lw_ptr, pid, lanes, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """-> (lane index, lane mask, state uint32, first word int32, end word int32) of a program's lanes."""
    if IDX64:
        lane = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        lane = pid * BLOCK + tl.arange(0, BLOCK)
    lm = lane < lanes
    x = tl.load(states_ptr + lane, mask=lm, other=0).to(tl.uint32, bitcast=True)
    ptr = tl.load(start_ptr + lane, mask=lm, other=0)
    end = ptr + tl.load(lw_ptr + lane, mask=lm, other=0)
    return lane, lm, x, ptr, end


@triton.jit
def _symbols_kernel(states_ptr, words_ptr, start_ptr, lw_ptr, slot_ptr, tid_ptr, out_ptr, err_ptr,
                    n, lanes, steps, n_words, n_tables, period,
                    K: tl.constexpr, TABLE_MODE: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    # states: [lanes] int32 (uint32 bits); words: [n_words] int16; start, lw: [lanes] int32
    # TABLE_MODE 0: one table; 1: tid [n] table index per symbol; 2: tid [n / period] local level
    # per column (nwc: table = tid[i // period] * 16 + i % 16). out: [n] uint8; err: [programs] int32
    pid = tl.program_id(0)
    lane, lm, x, ptr, end = lane_init(states_ptr, start_ptr, lw_ptr, pid, lanes, BLOCK, IDX64)
    i = lane
    for _t in range(steps):
        active = lm & (i < n)
        if TABLE_MODE == 0:
            base = tl.zeros([BLOCK], dtype=tl.int32)
        elif TABLE_MODE == 1:
            tid = tl.load(tid_ptr + i, mask=active, other=0).to(tl.int32)
            base = tl.minimum(tl.maximum(tid, 0), n_tables - 1) << K
        else:
            lvl = tl.load(tid_ptr + i // period, mask=active, other=0).to(tl.int32)
            tid = lvl * 16 + (i % 16).to(tl.int32)
            base = tl.minimum(tl.maximum(tid, 0), n_tables - 1) << K
        sym, x, ptr = rans_step(x, ptr, active, slot_ptr, base, words_ptr, n_words, K)
        tl.store(out_ptr + i, sym.to(tl.uint8), mask=active)
        i += lanes
    bad = lm & ((x != 65536) | (ptr != end))
    tl.store(err_ptr + pid, tl.sum(bad.to(tl.int32), axis=0))


def check_stream_args(states: Tensor, words: Tensor, lane_words: Tensor, precision_bits: int, n: int,
                      what: str) -> None:
    """Host-only checks of ``rans.decode`` (no sync): precision, lane count, field dtypes; and the
    kernel's own limit on the word count."""
    rans.check_stream_fields(states, words, lane_words, precision_bits, n, what)
    if words.numel() >= 1 << 31:
        raise CodecError(f"{what}: {words.numel()} rANS words exceed the GPU kernel's 2**31 limit; "
                         "decode with fast=False")


def error_counts(states: Tensor, lane_words: Tensor, err: Tensor, table_bad: Tensor,
                 extra_bad: Tensor | None = None) -> Tensor:
    """Device [6] int64: word total, negative counts, states below L, bad lanes, bad tables, bad ids."""
    lw = lane_words.to(torch.int64)
    x = states.to(torch.int64) & 0xFFFFFFFF
    zero = torch.zeros((), dtype=torch.int64, device=states.device)
    return torch.stack([lw.sum(), (lw < 0).sum(), (x < RANS_L).sum(), err.to(torch.int64).sum(),
                        table_bad.to(torch.int64), zero if extra_bad is None else extra_bad.to(torch.int64)])


def raise_if_corrupt(counts: Tensor, n_words: int, lanes: int, precision_bits: int, what: str) -> None:
    """One host sync on ``error_counts``; raises ``CorruptPayloadError`` as ``rans.decode`` would."""
    total, neg, low, bad_lanes, bad_tab, bad_ids = counts.tolist()
    if total != n_words or neg:
        raise CorruptPayloadError(f"{what}: lane word counts sum to {total} but the stream has {n_words} words; "
                                  "the payload is damaged or truncated")
    if low:
        raise CorruptPayloadError(f"{what}: {low} lane states are below the rANS lower bound; the payload is damaged")
    if bad_tab:
        raise CorruptPayloadError(f"{what}: frequency tables do not sum to {1 << precision_bits} or have negative "
                                  f"entries ({bad_tab} problems); the payload is damaged")
    if bad_ids:
        raise CorruptPayloadError(f"{what}: {bad_ids} table indices lie outside the tables; the payload is damaged")
    if bad_lanes:
        raise CorruptPayloadError(
            f"{what}: after decoding, {bad_lanes} of {lanes} lanes did not return to the initial state or did not "
            "consume exactly their words; the payload is damaged")


def _nonempty(words: Tensor) -> Tensor:
    # a stream without words still needs a valid pointer for the (fully masked) loads
    return words if words.numel() else torch.zeros(1, dtype=torch.int16, device=words.device)


def decode_symbols(states: Tensor, words: Tensor, lane_words: Tensor, tables: Tensor, precision_bits: int,
                   n: int, *, table_of: Tensor | None = None, column_table: Tensor | None = None,
                   period: int = 0, out: Tensor | None = None, check: bool = True,
                   what: str = "rANS stream") -> Tensor:
    """Decode ``n`` symbols -> [n] uint8 on the device of ``states``; equals ``rans.decode``.

    ``tables`` [T, A] or [A]; table of symbol ``i``: ``table_of[i]`` ([n], any integer dtype), or
    nwc's ``column_table[i // period] * 16 + i % 16`` (``column_table`` [n / period], ``period`` a
    multiple of 16), or row 0 when neither is given. The slot table covers all ``T`` rows (keep
    ``T`` small: pass only the rows in use). ``check=True``: one host sync, raises
    ``CorruptPayloadError`` naming ``what``; ``check=False``: no sync at all.
    """
    check_stream_args(states, words, lane_words, precision_bits, n, what)
    tab = tables.unsqueeze(0) if tables.dim() == 1 else tables
    if tab.dim() != 2 or not 1 <= tab.shape[1] <= rans.MAX_ALPHABET or tab.dtype.is_floating_point:
        raise CorruptPayloadError(f"{what}: frequency tables are {tables.dtype} {list(tables.shape)}, expected an "
                                  f"integer [T, A] or [A] with 1 <= A <= {rans.MAX_ALPHABET}")
    if table_of is not None and column_table is not None:
        raise CodecError("decode_symbols: give table_of or column_table, not both")
    dev = states.device
    lanes = states.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=dev)
    elif out.dtype != torch.uint8 or out.numel() != n or not out.is_contiguous():
        raise CodecError(f"decode_symbols: out must be a contiguous uint8 tensor of {n} elements")
    if n == 0:
        return out
    slot = slot_table(tab.to(dev), precision_bits)
    bad_ids = None
    if table_of is not None:
        if table_of.numel() != n:
            raise CorruptPayloadError(f"{what}: {table_of.numel()} table indices for {n} symbols")
        tid, mode, per = table_of.reshape(-1), 1, 1
        if check:
            bad_ids = ((tid < 0) | (tid >= tab.shape[0])).sum()
    elif column_table is not None:
        if period <= 0 or period % 16 or column_table.numel() * period != n:
            raise CodecError(f"decode_symbols: column_table of {column_table.numel()} entries and period {period} "
                             f"do not cover {n} symbols in 16-channel chunks")
        tid, mode, per = column_table.reshape(-1), 2, period
        if check:
            bad_ids = ((column_table < 0) | (column_table.to(torch.int64) * 16 + 15 >= tab.shape[0])).sum()
    else:
        if tab.shape[0] != 1:
            raise CodecError(f"{what}: {tab.shape[0]} tables need a table index per symbol (table_of)")
        tid, mode, per = states, 0, 1  # unused pointer
    steps = -(-n // lanes)
    block, warps = launch_config(lanes)
    grid = (triton.cdiv(lanes, block),)
    err = torch.empty(grid[0], dtype=torch.int32, device=dev)
    _symbols_kernel[grid](states, _nonempty(words), lane_starts(lane_words), lane_words, slot, tid, out, err,
                          n, lanes, steps, words.numel(), tab.shape[0], per,
                          K=precision_bits, TABLE_MODE=mode, BLOCK=block, IDX64=index_is_64bit(n, lanes),
                          num_warps=warps)
    if check:
        counts = error_counts(states, lane_words, err, table_errors(tab.to(dev), precision_bits), bad_ids)
        raise_if_corrupt(counts, words.numel(), lanes, precision_bits, what)
    return out
