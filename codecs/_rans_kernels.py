"""numba kernels behind ``thawed.codecs.rans_numba`` (importing this module needs numba).

Conventions are ``thawed.codecs.rans``'s: 32-bit state in ``[L, 2**32)``, ``L = 2**16``, 16-bit
renormalisation words, symbol ``i`` in lane ``i % lanes`` at step ``i // lanes``, words stored
lane-major. Indices are checked by the caller; ``boundscheck`` stays off for speed, so every array
read below is kept in range by construction (table ids are range-checked by ``used_tables``, word
reads by ``p < W``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_L = 1 << 16


# Explicit signatures: one compiled version each, built (or loaded from numba's cache) on import.
@njit("Tuple((int32[::1], int64[::1], int64))(int16[::1], int64)", cache=True, nogil=True)
def used_tables(table_of: np.ndarray, n_tables: int) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (local_of [T] int32: table id -> 0..U-1 or -1, used [U] int64 ids, ids outside [0, T)).

    An empty ``table_of`` means every symbol uses table 0."""
    seen = np.zeros(n_tables, dtype=np.bool_)
    bad = 0
    if table_of.shape[0] == 0:
        seen[0] = True
    for i in range(table_of.shape[0]):
        t = np.int64(table_of[i])
        if t < 0 or t >= n_tables:
            bad += 1
        else:
            seen[t] = True
    local_of = np.full(n_tables, -1, dtype=np.int32)
    u = 0
    for t in range(n_tables):
        if seen[t]:
            local_of[t] = u
            u += 1
    used = np.empty(u, dtype=np.int64)
    for t in range(n_tables):
        if seen[t]:
            used[local_of[t]] = t
    return local_of, used, bad


@njit("Tuple((uint8[::1], uint32[::1]))(int32[:, ::1], int64[::1], int64)", cache=True, nogil=True)
def slot_tables(tables: np.ndarray, used: np.ndarray, precision_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``used`` of ``tables`` [T, A] (checked: >= 0, summing to M) ->
    ``slot_sym`` [U * M] uint8 (symbol of each slot) and ``freq_cum`` [U * A] uint32 (freq << 16 | cum)."""
    m = 1 << precision_bits
    a = tables.shape[1]
    u = used.shape[0]
    slot_sym = np.empty(u * m, dtype=np.uint8)
    freq_cum = np.zeros(u * a, dtype=np.uint32)
    for j in range(u):
        row = used[j]
        c = 0
        for s in range(a):
            f = tables[row, s]
            freq_cum[j * a + s] = np.uint32((f << 16) | c)
            slot_sym[j * m + c:j * m + c + f] = s
            c += f
    return slot_sym, freq_cum


BLOCK = 64  # lanes decoded together, step by step (64: one step of a block fills a cache line of output)


@njit("int64[::1](uint32[::1], uint16[::1], int64[::1], int64[::1], uint8[::1], uint32[::1], int16[::1], "
      "int32[::1], int64, int64, int64, int64, uint8[::1])", cache=True, nogil=True)
def decode_range(states: np.ndarray, words: np.ndarray, start: np.ndarray, end: np.ndarray,
                 slot_sym: np.ndarray, freq_cum: np.ndarray, table_of: np.ndarray, local_of: np.ndarray,
                 precision_bits: int, n: int, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """Decode lanes ``lo..hi-1`` into ``out`` [n] uint8 -> [lanes not back at L, lanes whose word
    count is wrong] for this range.

    ``states`` [lanes] uint32, ``words`` [W >= 1] uint16 (a stream without words passes one zero
    word), ``start``/``end`` [lanes] int64 (each lane's word range), ``table_of`` [n] table ids
    (empty: all table 0), ``local_of`` [T] from ``used_tables``.

    Order: blocks of ``BLOCK`` adjacent lanes, step by step, lane by lane inside the block. The
    lanes of a block are independent, so the CPU overlaps their table lookups (a lane alone is one
    long dependency chain), their symbols are adjacent in ``out`` and ``table_of``, and at one
    step they use the same few tables (nwc: one column's 16), which stay in cache.
    Renormalisation is branch-free: the word at ``min(p, W - 1)`` is always read and used only when
    the state fell below ``L`` (a data-dependent branch here mispredicts every few symbols); a
    damaged lane reading past the last word reads 0, as the reference does.
    """
    lanes = states.shape[0]
    wmax = np.int64(words.shape[0] - 1)
    k = np.int64(precision_bits)
    m = np.int64(1) << k
    a = np.int64(freq_cum.shape[0] // max(1, slot_sym.shape[0] // m))
    mask = m - 1
    um, ua = np.uint64(m), np.uint64(a)
    steps = (n + lanes - 1) // lanes
    last_active = n - (steps - 1) * lanes
    multi = table_of.shape[0] > 0
    bad = np.zeros(2, dtype=np.int64)
    xs = np.empty(BLOCK, dtype=np.int64)
    ps = np.empty(BLOCK, dtype=np.int64)
    for j0 in range(lo, hi, BLOCK):
        g = min(BLOCK, hi - j0)
        for q in range(g):
            xs[q] = states[j0 + q]
            ps[q] = start[j0 + q]
        for t in range(steps):
            active = g if t < steps - 1 else max(0, min(g, last_active - j0))
            base = t * lanes + j0
            for q in range(active):
                # unsigned indices: numba adds a negative-index wraparound to every signed one (here
                # ~40 % of the loop's time); every index below is >= 0 by construction
                i = np.uint64(base + q)
                qq = np.uint64(q)
                x = xs[qq]
                u = np.uint64(local_of[np.uint64(table_of[i])]) if multi else np.uint64(0)
                slot = np.uint64(x & mask)
                s = slot_sym[u * um + slot]
                out[i] = s
                fc = np.int64(freq_cum[u * ua + np.uint64(s)])
                x = (fc >> 16) * (x >> k) + np.int64(slot) - (fc & 0xFFFF)  # freq * (x >> k) + slot - cum
                p = ps[qq]
                need = x < _L
                # past the end: 0, as the reference
                w = np.int64(words[np.uint64(min(p, wmax))]) if p <= wmax else np.int64(0)
                xs[qq] = ((x << 16) | w) if need else x
                ps[qq] = p + need
        for q in range(g):
            bad[0] += xs[q] != _L
            bad[1] += ps[q] != end[j0 + q]
    return bad


@njit("void(uint8[::1], uint8[:, ::1], uint32[::1], int64, int64)", cache=True, nogil=True)
def assemble_f32(exp: np.ndarray, rest: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """``lossless`` float32 bits ``lo..hi-1``: decoded exponents [n] and the stored byte planes
    ``rest`` [3, n] (low byte first of ``sign << 23 | mantissa``) -> ``out`` [n] uint32 patterns,
    ``sign << 31 | exponent << 23 | mantissa`` (the reference is ``Lossless.decode``'s torch code)."""
    for i in range(lo, hi):
        r2 = np.int64(rest[2, i])
        mant = np.int64(rest[0, i]) | (np.int64(rest[1, i]) << 8) | ((r2 & 0x7F) << 16)
        out[i] = ((r2 >> 7) << 31) | (np.int64(exp[i]) << 23) | mant


@njit("void(uint8[::1], int64[::1], int64[::1], int64[::1], int64, int64, int64, int64, uint32[::1], int32[::1], "
      "uint16[:, ::1], int64, int64)", cache=True, nogil=True)
def encode_range(sym: np.ndarray, table_of: np.ndarray, freq: np.ndarray, cum: np.ndarray, a: int,
                 precision_bits: int, lanes: int, n: int, states: np.ndarray, counts: np.ndarray, buf: np.ndarray,
                 lo: int, hi: int) -> None:
    """Encode lanes ``lo..hi-1`` (``rans.encode``'s loop, one lane at a time, last step first).

    ``sym`` [n], ``table_of`` [n] table ids (empty: all table 0), ``freq``/``cum`` [T * A] (checked
    by the caller: every coded symbol has ``freq >= 1``). Writes ``states`` [lanes] (final encoder
    state = the decoder's initial one), ``counts`` [lanes] words emitted and ``buf`` [lanes, steps]
    the words in emission order (the decoder reads them reversed).
    """
    k = precision_bits
    has_t = table_of.shape[0] > 0
    for j in range(lo, hi):
        x = np.int64(_L)
        c = 0
        steps_j = (n - j + lanes - 1) // lanes
        for t in range(steps_j - 1, -1, -1):
            i = j + t * lanes
            r = np.int64(sym[i])
            if has_t:
                r += table_of[i] * a
            f = freq[r]
            if x >= (f << (32 - k)):
                buf[j, c] = np.uint16(x & 0xFFFF)
                c += 1
                x >>= 16
            x = ((x // f) << k) + x % f + cum[r]
        states[j] = np.uint32(x)
        counts[j] = c


@njit("void(uint16[:, ::1], int32[::1], int64[::1], uint16[::1], int64, int64)", cache=True, nogil=True)
def gather_words(buf: np.ndarray, counts: np.ndarray, start: np.ndarray, words: np.ndarray, lo: int, hi: int) -> None:
    """Lane-major stream ``words`` in read order from ``encode_range``'s ``buf`` (lanes ``lo..hi-1``)."""
    for j in range(lo, hi):
        c = counts[j]
        s = start[j]
        for q in range(c):
            words[s + q] = buf[j, c - 1 - q]


@njit("void(uint8[:, ::1], int64[::1], float32[:, ::1], float32[::1], int64, int64, int64, int64, float32[:, ::1], "
      "float32[:, ::1])", cache=True, nogil=True)
def nwc_inputs(sym: np.ndarray, slot: np.ndarray, gain: np.ndarray, b3: np.ndarray, c0: int, c1: int, r0: int,
               r1: int, x: np.ndarray, acc: np.ndarray) -> None:
    """``nwc``'s decoder input for the block of columns ``c0..c1-1`` x rows ``r0..r1-1`` (multiples of
    16; ``sym`` [cols, P] uint8 as the rANS decoder writes it). The chunk of column ``c0 + j`` at
    rows ``r0 + 16 q ..`` is block row ``q * (c1 - c0) + j``. Writes ``x`` [B, 16 + U]: the 16
    latents ``z = (symbol - 128) * gain[slot[col]]`` (``decode_chunks``' float32 product), then a
    one-hot of the column's rate slot (``slot`` [cols] in 0..U-1, ``gain`` [U, 16]), which picks
    that slot's first-layer bias in the matmul; and ``acc`` [16, B] = ``z + b3``, transposed: the
    residual and last bias, to which the last layer's matmul is added in place."""
    nb = np.uint64(c1 - c0)  # unsigned indices throughout: no wraparound checks (see decode_range)
    m = np.uint64((r1 - r0) // 16)
    kk = np.uint64(x.shape[1])
    off = np.float32(128.0)
    for j in range(nb):
        col = np.uint64(c0) + j
        s = np.uint64(slot[col])
        for q in range(m):
            row = q * nb + j
            b = np.uint64(r0) + q * np.uint64(16)
            for ch in range(np.uint64(16)):
                z = (np.float32(sym[col, b + ch]) - off) * gain[s, ch]
                x[row, ch] = z
                acc[ch, row] = z + b3[ch]
            for u in range(np.uint64(16), kk):
                x[row, u] = np.float32(0.0)
            x[row, np.uint64(16) + s] = np.float32(1.0)


@njit("void(float32[:, ::1], int64, int64, int64, int64, float32[::1], float32[:, ::1])", cache=True, nogil=True)
def nwc_store(acc: np.ndarray, c0: int, c1: int, r0: int, r1: int, scale: np.ndarray, out: np.ndarray) -> None:
    """``nwc``'s last decoder step for a block (``nwc_inputs``' layout): the decoded chunks ``acc``
    [16, B] (residual + last layer, transposed) times the row scale into the weight ``out`` [rows,
    cols] at rows ``r0..`` (those that exist: the padding rows are dropped) and columns
    ``c0..c1-1``. In this layout a block row ``q``'s channel ``ch`` is ``acc[ch, q*nb : (q+1)*nb]``,
    contiguous, and lands contiguous in row ``r0 + 16 q + ch`` of ``out``: a plain scaled copy."""
    nb = np.uint64(c1 - c0)  # unsigned indices: no wraparound checks (see decode_range)
    m = np.uint64((r1 - r0) // 16)
    rows = np.uint64(out.shape[0])
    for q in range(m):
        for ch in range(np.uint64(16)):
            r = np.uint64(r0) + q * np.uint64(16) + ch
            if r >= rows:
                return
            s = scale[r]
            base = q * nb
            for j in range(nb):
                out[r, np.uint64(c0) + j] = acc[ch, base + j] * s
