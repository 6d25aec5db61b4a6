"""Interleaved rANS entropy coding of small-alphabet symbols (<= 256): one coder, an optional table index.

Symbol ``i`` belongs to lane ``i % lanes`` at step ``i // lanes``; every lane is an independent
rANS stream with

- a 32-bit state ``x`` kept in ``[L, 2**32)``, ``L = 2**16``, renormalised by 16-bit words
  (each step reads or writes at most one word per lane);
- static frequency tables ``tables`` [T, A] (or one table [A]), each row quantised to
  ``M = 2**precision_bits`` (``precision_bits`` 8..15); symbol ``i`` is coded with row
  ``table_of[i]`` when a table index ``table_of`` [N] is given, else with the single row.

Who stores the tables is the caller's business: ``lossless`` fits one table per tensor
(``fit_table``) and stores it in the payload; ``nwc`` codes each latent channel and rate level with
its own learned table (``table_of`` from side information), stored once per file.

The encoder runs from the last step to the first and starts every lane at ``x = L``; the decoder
starts from the encoder's final states and must end with every lane back at ``L`` having read
exactly its own words -- a cheap integrity check that catches nearly every corruption.

Stream layout (``RansStream``)::

    states:     [lanes] int32      # uint32 bit pattern: initial decoder state per lane
    words:      [W] int16          # uint16 bit pattern: lane 0's words in read order, then lane 1's, ...
    lane_words: [lanes] int32      # number of words of each lane, sum == W

Lanes: ``ceil(n / steps)`` (``steps`` default ``TARGET_STEPS = 512``; nwc uses 2048); the per-lane
cost is 8 stored bytes (state + word count), 0.125 bits per symbol at 512 steps.

Decoders (same symbols, bit for bit; ``decode`` validates, then picks one):

- ``rans_numba`` (compiled, CPU): every lane a scalar loop, lanes split over threads; chosen
  automatically when numba imports and the stream is on the CPU;
- ``decode_reference`` (pure PyTorch, any device): a Python loop over *steps* with vectorised
  torch ops across *lanes* -- 11 small ops per step, ~20 us per step on a CPU whatever the lane
  count, so it is fast only for many lanes (nwc's 2048-step lanes: ~8 M symbols/s at best, vs
  ~80 M symbols/s per thread compiled; docs/NWC.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CodecError, CorruptPayloadError

__all__ = ["RansStream", "encode", "decode", "decode_reference", "fit_table", "quantize_frequencies",
           "check_tables", "code_lengths", "choose_lanes", "RANS_L", "DEFAULT_PRECISION", "MIN_PRECISION",
           "MAX_PRECISION", "TARGET_STEPS", "MAX_ALPHABET", "BACKENDS"]

log = logging.getLogger(__name__)

RANS_L = 1 << 16  # lower bound of the state; words are 16 bits
DEFAULT_PRECISION = 12
MIN_PRECISION, MAX_PRECISION = 8, 15
TARGET_STEPS = 512
MAX_ALPHABET = 256
BACKENDS = ("auto", "numba", "torch")
_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class RansStream:
    """An encoded symbol sequence (tensors on the CPU)."""

    states: Tensor  # [lanes] int32 (uint32 bit pattern)
    words: Tensor  # [W] int16 (uint16 bit pattern)
    lane_words: Tensor  # [lanes] int32
    n: int
    lanes: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.states, self.words, self.lane_words))


def choose_lanes(n: int, target_steps: int = TARGET_STEPS) -> int:
    """Lanes so that a big input decodes in about ``target_steps`` steps (at least one lane)."""
    return max(1, -(-n // target_steps))


def quantize_frequencies(counts: Tensor, precision_bits: int) -> Tensor:
    """Symbol counts [alphabet] -> int64 frequencies summing to ``2**precision_bits``.

    Every symbol with a nonzero count gets at least 1; the rounding is then corrected greedily by
    the smallest loss in code length (counts * log2 of the frequency ratio).
    """
    m_total = 1 << precision_bits
    c = counts.to(torch.float64)
    n = float(c.sum())
    present = c > 0
    if int(present.sum()) > m_total:
        raise CodecError(f"{int(present.sum())} distinct symbols need precision_bits > {precision_bits}")
    if n == 0:
        f = torch.zeros(counts.numel(), dtype=torch.int64)
        f[0] = m_total
        return f
    f = torch.where(present, (c * m_total / n).floor().clamp(min=1), torch.zeros_like(c))
    diff = m_total - int(f.sum())
    # Adjust one unit at a time where it costs least (the alphabet is <= 256, |diff| <= alphabet).
    while diff != 0:
        if diff > 0:
            gain = torch.where(present, c * torch.log2((f + 1) / f.clamp(min=1)), torch.full_like(c, -1.0))
            i = int(gain.argmax())
            f[i] += 1
            diff -= 1
        else:
            loss = torch.where(present & (f > 1), c * torch.log2(f / (f - 1).clamp(min=1)),
                               torch.full_like(c, math.inf))
            i = int(loss.argmin())
            f[i] -= 1
            diff += 1
    return f.to(torch.int64)


def _check_precision(precision_bits: int) -> None:
    if not MIN_PRECISION <= precision_bits <= MAX_PRECISION:
        raise CodecError(f"rANS precision_bits must be {MIN_PRECISION}..{MAX_PRECISION}, got {precision_bits}")


def fit_table(symbols: Tensor, alphabet: int, precision_bits: int = DEFAULT_PRECISION) -> Tensor:
    """The table of one symbol sequence: [alphabet] int32 quantised counts (sum ``2**precision_bits``;
    absent symbols 0; all mass on symbol 0 for an empty input)."""
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise CodecError(f"rANS alphabet must be 1..{MAX_ALPHABET}, got {alphabet}")
    _check_precision(precision_bits)
    sym = _symbols_u8_or_long(symbols)
    if sym.numel() and (int(sym.min()) < 0 or int(sym.max()) >= alphabet):
        raise CodecError(f"rANS symbols must lie in [0, {alphabet}), got [{int(sym.min())}, {int(sym.max())}]")
    return quantize_frequencies(torch.bincount(sym, minlength=alphabet), precision_bits).to(torch.int32)


def check_tables(tables: Tensor, precision_bits: int, *, what: str = "rANS tables") -> None:
    """Raise ``CorruptPayloadError`` unless every row is >= 1 and sums to ``2**precision_bits`` --
    what a table must satisfy to code *any* symbol (nwc's learned tables)."""
    if not MIN_PRECISION <= precision_bits <= MAX_PRECISION:
        raise CorruptPayloadError(f"{what}: precision_bits={precision_bits} is outside {MIN_PRECISION}..{MAX_PRECISION}")
    if tables.dim() != 2 or tables.shape[1] > MAX_ALPHABET or tables.dtype.is_floating_point:
        raise CorruptPayloadError(f"{what}: expected an integer [T, A<=256] table, got {tables.dtype} {list(tables.shape)}")
    t = tables.to(torch.int64)
    bad = torch.stack([(t.sum(1) != (1 << precision_bits)).sum(), (t < 1).sum()]).tolist()
    if bad[0] or bad[1]:
        raise CorruptPayloadError(
            f"{what}: {bad[0]} rows do not sum to {1 << precision_bits} and {bad[1]} entries are < 1; "
            "the shared codec state is damaged"
        )


def code_lengths(symbols: Tensor, table_of: Tensor, tables: Tensor, precision_bits: int) -> Tensor:
    """Ideal code length in bits of every symbol (``precision_bits - log2 f``); rANS is within ~0.01 %."""
    a = tables.shape[-1]
    f = tables.reshape(-1).to(torch.float64)[table_of.long() * a + symbols.long()]
    return precision_bits - torch.log2(f)


def _to_i32(x: Tensor) -> Tensor:
    """int64 holding uint32 values -> int32 with the same bit pattern."""
    return ((x + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _to_i16(x: Tensor) -> Tensor:
    return ((x + (1 << 15)) % (1 << 16) - (1 << 15)).to(torch.int16)


def _symbols_u8_or_long(symbols: Tensor) -> Tensor:
    # Symbols stay uint8 when they are (alphabet <= 256): the big per-tensor arrays stay one byte wide.
    sym = symbols.detach().reshape(-1).to("cpu")
    return sym if sym.dtype == torch.uint8 else sym.to(torch.int64)


def _as_2d(tables: Tensor) -> Tensor:
    return tables.unsqueeze(0) if tables.dim() == 1 else tables


def encode(symbols: Tensor, tables: Tensor, precision_bits: int = DEFAULT_PRECISION, *,
           table_of: Tensor | None = None, lanes: int | None = None, steps: int = TARGET_STEPS,
           backend: str = "auto") -> RansStream:
    """Entropy-code ``symbols`` ([N] integers in ``[0, A)``) with ``tables`` ([T, A] or [A]); symbol
    ``i`` uses row ``table_of[i]`` ([N]) or, without ``table_of``, the single row (T must be 1).

    ``lanes`` (default ``ceil(N / steps)``) sets the number of independent streams. Every symbol
    coded must have a frequency >= 1 in its row. ``backend``: ``"auto"`` (compiled when numba
    imports: ~50x faster for big tensors, the same stream), ``"numba"`` or ``"torch"`` (the loop
    below, vectorised across lanes: the reference)."""
    if backend not in BACKENDS:
        raise CodecError(f"rANS backend must be one of {BACKENDS}, got {backend!r}")
    _check_precision(precision_bits)
    tab = _as_2d(tables)
    if tab.dim() != 2 or not 1 <= tab.shape[1] <= MAX_ALPHABET or tab.dtype.is_floating_point:
        raise CodecError(f"rANS tables must be integer [T, A<=256] or [A], got {tables.dtype} {list(tables.shape)}")
    if table_of is None and tab.shape[0] != 1:
        raise CodecError(f"rANS: {tab.shape[0]} tables need a table index per symbol (table_of)")
    t64 = tab.to(torch.int64)
    if bool((t64.sum(1) != (1 << precision_bits)).any()) or bool((t64 < 0).any()):
        raise CodecError(f"rANS tables must be >= 0 with rows summing to {1 << precision_bits}")
    if steps < 1:
        raise CodecError(f"rANS steps per lane must be >= 1, got {steps}")
    sym = _symbols_u8_or_long(symbols)
    n = sym.numel()
    a = tab.shape[1]
    if n and (int(sym.min()) < 0 or int(sym.max()) >= a):
        raise CodecError(f"rANS symbols must lie in [0, {a}), got [{int(sym.min())}, {int(sym.max())}]")
    tid = None
    if table_of is not None:
        tid = table_of.detach().reshape(-1).to("cpu", torch.int64)
        if tid.numel() != n:
            raise CodecError(f"rANS: {n} symbols but {tid.numel()} table indices")
        if n and (int(tid.min()) < 0 or int(tid.max()) >= tab.shape[0]):
            raise CodecError(f"rANS: table indices must lie in [0, {tab.shape[0]})")
    lanes = choose_lanes(n, steps) if lanes is None else int(lanes)
    if lanes < 1:
        raise CodecError(f"rANS needs at least one lane, got {lanes}")
    k = precision_bits
    freq = t64.reshape(-1)
    cum = (torch.cumsum(t64, 1) - t64).reshape(-1)
    if tid is not None and bool((freq[tid * a + sym.long()] == 0).any()):
        raise CodecError("rANS: a symbol has frequency 0 in its table and cannot be coded")
    if tid is None and n and bool((freq[sym.long()] == 0).any()):
        raise CodecError("rANS: a symbol has frequency 0 in the table and cannot be coded")
    if backend != "torch" and n:
        from . import rans_numba

        if rans_numba.available():
            st, words, lw = rans_numba.encode_lanes(sym, tid, freq, cum, a, k, lanes)
            return RansStream(states=st, words=words, lane_words=lw, n=n, lanes=lanes)
        if backend == "numba":
            raise CodecError("rANS backend 'numba' needs numba installed")
    n_steps = -(-n // lanes)
    x = torch.full((lanes,), RANS_L, dtype=torch.int64)
    emitted = torch.zeros((n_steps, lanes), dtype=torch.int16)  # uint16 bit patterns
    did = torch.zeros((n_steps, lanes), dtype=torch.bool)
    padded = torch.zeros(n_steps * lanes, dtype=torch.uint8)
    padded[:n] = sym.to(torch.uint8)
    grid = padded.view(n_steps, lanes)
    tgrid = None
    if tid is not None:
        tpad = torch.zeros(n_steps * lanes, dtype=torch.int64)
        tpad[:n] = tid * a
        tgrid = tpad.view(n_steps, lanes)
    last_active = n - (n_steps - 1) * lanes if n_steps else 0
    for t in range(n_steps - 1, -1, -1):
        active = lanes if t < n_steps - 1 else last_active
        xa = x[:active]
        r = grid[t, :active].long()
        if tgrid is not None:
            r = r + tgrid[t, :active]
        f = freq[r]
        emit = xa >= (f << (32 - k))  # x_max(s) = ((L >> k) << 16) * f
        emitted[t, :active] = _to_i16(xa & 0xFFFF)
        did[t, :active] = emit
        xa = torch.where(emit, xa >> 16, xa)
        x[:active] = (xa // f << k) + xa % f + cum[r]
    # Decoder reads lane j's words in increasing step order: lane-major concatenation.
    words = emitted.t()[did.t()]
    return RansStream(states=_to_i32(x), words=words, lane_words=did.sum(0).to(torch.int32), n=n, lanes=lanes)


def decode(states: Tensor, words: Tensor, lane_words: Tensor, tables: Tensor, precision_bits: int, n: int, *,
           table_of: Tensor | None = None, what: str = "rANS stream", backend: str = "auto") -> Tensor:
    """Decode ``n`` symbols -> [n] uint8 on the device of ``states``.

    ``tables`` [T, A] or [A]; ``table_of`` [n] (any integer dtype) as in ``encode``. Only the rows
    the stream uses are checked (>= 0, summing to ``2**precision_bits``). ``backend``: ``"auto"``
    (compiled when numba imports and everything is on the CPU, else the reference), ``"numba"``
    (raises ``CodecError`` when unavailable), ``"torch"`` (the reference). Raises
    ``CorruptPayloadError`` (naming ``what``) when the stream is inconsistent: bad table, word
    counts that do not add up, a lane that reads more or fewer words than it owns, or a lane whose
    final state is not ``L``.
    """
    if backend not in BACKENDS:
        raise CodecError(f"rANS backend must be one of {BACKENDS}, got {backend!r}")
    k = precision_bits
    check_stream_fields(states, words, lane_words, precision_bits, n, what)
    tab = _as_2d(tables)
    if (tab.dim() != 2 or not 1 <= tab.shape[1] <= MAX_ALPHABET or tab.shape[0] < 1
            or tab.dtype.is_floating_point or tab.dtype == torch.bool):
        raise CorruptPayloadError(f"{what}: frequency tables are {tables.dtype} {list(tables.shape)}, expected an "
                                  f"integer [T, A] or [A] with 1 <= A <= {MAX_ALPHABET}")
    if table_of is None and tab.shape[0] != 1:
        raise CodecError(f"{what}: {tab.shape[0]} tables need a table index per symbol (table_of)")
    if table_of is not None and table_of.numel() != n:
        raise CorruptPayloadError(f"{what}: {table_of.numel()} table indices for {n} symbols")
    lw = lane_words.to(torch.int64)
    x = states.to(torch.int64) & _U32
    checks = torch.stack([lw.sum(), (lw < 0).sum(), (x < RANS_L).sum()]).tolist()  # one host sync
    if checks[0] != words.numel() or checks[1]:
        raise CorruptPayloadError(
            f"{what}: lane word counts sum to {checks[0]} but the stream has {words.numel()} words; "
            "the payload is damaged or truncated"
        )
    if checks[2]:
        raise CorruptPayloadError(f"{what}: {checks[2]} lane states are below the rANS lower bound; "
                                  "the payload is damaged")
    on_cpu = all(t.device.type == "cpu" for t in (states, words, lane_words, tab)) and (
        table_of is None or table_of.device.type == "cpu")
    use_numba = backend == "numba" or (backend == "auto" and on_cpu)
    if use_numba:
        from . import rans_numba

        if rans_numba.available() and on_cpu and tab.shape[0] <= rans_numba.MAX_TABLES:
            return _decode_numba(states, words, lane_words, tab, k, n, table_of, what)
        if backend == "numba":
            raise CodecError("rANS backend 'numba' needs numba installed and the stream on the CPU")
    return decode_reference(states, words, lane_words, tab, k, n, table_of=table_of, what=what)


def check_stream_fields(states: Tensor, words: Tensor, lane_words: Tensor, precision_bits: int, n: int,
                        what: str) -> int:
    """The checks of a stream that need no data (precision, lane count, field dtypes and shapes),
    shared by every decoder (the GPU kernel's too); returns the lane count."""
    k = precision_bits
    if not MIN_PRECISION <= k <= MAX_PRECISION:
        raise CorruptPayloadError(f"{what}: precision_bits={k} is outside {MIN_PRECISION}..{MAX_PRECISION}")
    lanes = states.numel()
    if lanes < 1 or n < 0 or lanes > max(1, n):
        raise CorruptPayloadError(f"{what}: {lanes} lanes for {n} symbols are invalid (need 1 <= lanes <= max(1, n))")
    for name, t, dt in (("states", states, torch.int32), ("words", words, torch.int16),
                        ("lane_words", lane_words, torch.int32)):
        if t.dtype != dt or t.dim() != 1:
            raise CorruptPayloadError(f"{what}: field {name!r} is {t.dtype} {list(t.shape)}, expected {dt} [*]")
    if lane_words.numel() != lanes:
        raise CorruptPayloadError(f"{what}: field 'states' has {lanes} lanes but 'lane_words' has "
                                  f"{lane_words.numel()}; the payload is damaged")
    return lanes


def _check_rows(rows: Tensor, precision_bits: int, what: str) -> None:
    f = rows.to(torch.int64)
    sums = f.sum(1)
    bad = torch.stack([(sums != (1 << precision_bits)).sum(), (f < 0).sum()]).tolist()
    if bad[0] or bad[1]:
        first = int(sums[sums != (1 << precision_bits)][0]) if bad[0] else int(sums[0])
        raise CorruptPayloadError(
            f"{what}: frequencies sum to {first} (rows off: {bad[0]}, negative entries: {bad[1]}), "
            f"expected {1 << precision_bits}; the payload is damaged"
        )


def _raise_end_state(what: str, bad_state: int, bad_words: int, lanes: int) -> None:
    if bad_state or bad_words:
        raise CorruptPayloadError(
            f"{what}: after decoding, {bad_state} of {lanes} lanes did not return to the initial state and "
            f"{bad_words} lanes did not consume exactly their words; the payload is damaged"
        )


def _decode_numba(states: Tensor, words: Tensor, lane_words: Tensor, tab: Tensor, k: int, n: int,
                  table_of: Tensor | None, what: str) -> Tensor:
    from . import rans_numba

    if table_of is not None and table_of.dtype not in (torch.int16, torch.uint8) and n:
        lo, hi = (int(v) for v in torch.aminmax(table_of))  # the kernels take int16 ids: check before narrowing
        if lo < 0 or hi >= tab.shape[0]:
            raise CorruptPayloadError(f"{what}: table indices span [{lo}, {hi}], outside [0, {tab.shape[0]}); "
                                      "the payload is damaged")
    used, local_of, out_of_range = rans_numba.used_tables(tab, table_of)
    if out_of_range:
        raise CorruptPayloadError(f"{what}: {out_of_range} table indices lie outside [0, {tab.shape[0]}); "
                                  "the payload is damaged")
    _check_rows(tab[torch.from_numpy(used)], k, what)
    out, bad_state, bad_words = rans_numba.decode_lanes(states, words, lane_words, tab, used, local_of, k, n,
                                                        table_of)
    _raise_end_state(what, bad_state, bad_words, states.numel())
    return out


def decode_reference(states: Tensor, words: Tensor, lane_words: Tensor, tables: Tensor, precision_bits: int,
                     n: int, *, table_of: Tensor | None = None, what: str = "rANS stream") -> Tensor:
    """The pure-PyTorch decoder (any device): a loop over steps, vectorised across lanes. Expects
    the field checks of ``decode`` done (its table-row and end-state checks are done here)."""
    device = states.device
    k = precision_bits
    lanes = states.numel()
    m_total = 1 << k
    tab = _as_2d(tables)
    lw = lane_words.to(device=device, dtype=torch.int64)
    x = states.to(torch.int64) & _U32
    if table_of is None:
        used = torch.zeros(1, dtype=torch.int64, device=device)
        local = None
    else:
        used, local = torch.unique(table_of.reshape(-1).to(device=device, dtype=torch.int64), return_inverse=True)
        if used.numel() and (int(used[0]) < 0 or int(used[-1]) >= tab.shape[0]):
            bad = int(((used < 0) | (used >= tab.shape[0])).sum())
            raise CorruptPayloadError(f"{what}: {bad} distinct table indices lie outside [0, {tab.shape[0]}); "
                                      "the payload is damaged")
    f64 = tab.to(device=device, dtype=torch.int64)[used]  # [U, A]
    _check_rows(f64, k, what)
    u, a = f64.shape
    # Per-slot tables of the used rows: symbol, and (slot - cum[symbol], frequency) as one [U*M, 2] row.
    flat = f64.reshape(-1)
    row_of_slot = torch.repeat_interleave(torch.arange(u * a, device=device), flat, output_size=u * m_total)
    cum = (torch.cumsum(f64, 1) - f64).reshape(-1)
    slot_in_table = torch.arange(m_total, device=device).repeat(u)
    slot_tab = torch.stack([slot_in_table - cum[row_of_slot], flat[row_of_slot]], 1)  # [U*M, 2]
    sym_u8 = (row_of_slot % a).to(torch.uint8)
    steps = -(-n // lanes) if n else 0
    base = None
    if local is not None:
        base = torch.zeros(steps * lanes, dtype=torch.int64, device=device)
        base[:n] = local * m_total
        base = base.view(steps, lanes)
    ptr = torch.cumsum(lw, 0) - lw  # next word of each lane
    end = ptr + lw
    # A lane reads at most one word per step, so `steps` zero words past the end keep every read
    # in bounds even for a damaged stream; the final check then reports it.
    w64 = torch.zeros(words.numel() + steps + 1, dtype=torch.int64, device=device)
    w64[: words.numel()] = words.to(device=device, dtype=torch.int64) & 0xFFFF
    out = torch.empty((steps, lanes), dtype=torch.uint8, device=device)
    mask = m_total - 1
    last_active = n - (steps - 1) * lanes if steps else 0
    for t in range(steps):
        active = last_active if t == steps - 1 else lanes
        xa, pa = (x[:active], ptr[:active]) if active < lanes else (x, ptr)
        row = xa & mask
        if base is not None:
            row.add_(base[t, :active])
        torch.index_select(sym_u8, 0, row, out=out[t, :active])
        tab2 = torch.index_select(slot_tab, 0, row)
        xn = torch.addcmul(tab2[:, 0], tab2[:, 1], xa >> k)  # f * (x >> k) + slot - cum
        need = xn < RANS_L
        w = torch.index_select(w64, 0, pa)
        torch.where(need, (xn << 16).bitwise_or_(w), xn, out=xa)
        pa.add_(need)
    bad = torch.stack([(x != RANS_L).sum(), (ptr != end).sum()]).tolist()
    _raise_end_state(what, bad[0], bad[1], lanes)
    return out.view(-1)[:n]
