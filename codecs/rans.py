"""Interleaved rANS entropy coding of small-alphabet symbols (<= 256) in pure PyTorch.

Any device decodes: the decoder is a Python loop over *steps* with vectorised torch ops across
*lanes*. Symbol ``i`` belongs to lane ``i % lanes`` at step ``i // lanes``; every lane is an
independent rANS stream with

- a 32-bit state ``x`` kept in ``[L, 2**32)``, ``L = 2**16``, renormalised by 16-bit words
  (each step reads or writes at most one word per lane);
- a static frequency table quantised to ``M = 2**precision_bits`` (``precision_bits`` 8..15,
  default 12); every symbol present in the input keeps a frequency >= 1.

The encoder runs from the last step to the first and starts every lane at ``x = L``; the decoder
starts from the encoder's final states and must end with every lane back at ``L`` having read
exactly its own words -- a cheap integrity check that catches nearly every corruption.

Stream layout (``RansStream``)::

    freq:       [alphabet] int32   # quantised frequencies, sum == M (all zero but symbol 0 == M if n == 0)
    states:     [lanes] int32      # uint32 bit pattern: initial decoder state per lane
    words:      [W] int16          # uint16 bit pattern: lane 0's words in read order, then lane 1's, ...
    lane_words: [lanes] int32      # number of words of each lane, sum == W

Lanes: ``ceil(n / TARGET_STEPS)`` with ``TARGET_STEPS = 512``, so big inputs decode in ~512 steps;
the per-lane cost is 8 stored bytes (state + word count), 0.125 bits per symbol at 512 steps.
Decode cost: 11 small torch ops per step. On 2 CPU cores: ~10 ns per symbol for big inputs
(22 M symbols in 0.23 s); small inputs pay ~22 us per step (147 k symbols: 11 ms, 75 ns/symbol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CodecError, CorruptPayloadError

__all__ = ["RansStream", "encode", "decode", "quantize_frequencies", "choose_lanes", "stream_nbytes",
           "RANS_L", "DEFAULT_PRECISION", "TARGET_STEPS"]

RANS_L = 1 << 16  # lower bound of the state; words are 16 bits
DEFAULT_PRECISION = 12
MIN_PRECISION, MAX_PRECISION = 8, 15
TARGET_STEPS = 512
MAX_ALPHABET = 256
_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class RansStream:
    """An encoded symbol sequence; tensors on the CPU, params in ``n``/``lanes``/``precision_bits``."""

    freq: Tensor  # [alphabet] int32
    states: Tensor  # [lanes] int32 (uint32 bit pattern)
    words: Tensor  # [W] int16 (uint16 bit pattern)
    lane_words: Tensor  # [lanes] int32
    n: int
    lanes: int
    precision_bits: int

    @property
    def nbytes(self) -> int:
        return stream_nbytes(self.freq, self.states, self.words, self.lane_words)


def stream_nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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


def _to_i32(x: Tensor) -> Tensor:
    """int64 holding uint32 values -> int32 with the same bit pattern."""
    return ((x + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _to_i16(x: Tensor) -> Tensor:
    return ((x + (1 << 15)) % (1 << 16) - (1 << 15)).to(torch.int16)


def encode(symbols: Tensor, alphabet: int, *, precision_bits: int = DEFAULT_PRECISION,
           lanes: int | None = None) -> RansStream:
    """Entropy-code ``symbols`` ([N] integers in ``[0, alphabet)``)."""
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise CodecError(f"rANS alphabet must be 1..{MAX_ALPHABET}, got {alphabet}")
    if not MIN_PRECISION <= precision_bits <= MAX_PRECISION:
        raise CodecError(f"rANS precision_bits must be {MIN_PRECISION}..{MAX_PRECISION}, got {precision_bits}")
    # Symbols are kept as uint8 (alphabet <= 256): the big per-tensor arrays stay one byte wide.
    sym = symbols.detach().reshape(-1).to("cpu")
    if sym.dtype != torch.uint8:
        sym = sym.to(torch.int64)
    n = sym.numel()
    if n and (int(sym.min()) < 0 or int(sym.max()) >= alphabet):
        raise CodecError(f"rANS symbols must lie in [0, {alphabet}), got [{int(sym.min())}, {int(sym.max())}]")
    lanes = choose_lanes(n) if lanes is None else int(lanes)
    if lanes < 1:
        raise CodecError(f"rANS needs at least one lane, got {lanes}")
    k = precision_bits
    freq = quantize_frequencies(torch.bincount(sym, minlength=alphabet), k)
    cum = torch.cumsum(freq, 0) - freq
    steps = -(-n // lanes)
    x = torch.full((lanes,), RANS_L, dtype=torch.int64)
    emitted = torch.zeros((steps, lanes), dtype=torch.int16)  # uint16 bit patterns
    did = torch.zeros((steps, lanes), dtype=torch.bool)
    padded = torch.zeros(steps * lanes, dtype=torch.uint8)
    padded[:n] = sym.to(torch.uint8)
    grid = padded.view(steps, lanes)
    last_active = n - (steps - 1) * lanes if steps else 0
    for t in range(steps - 1, -1, -1):
        active = lanes if t < steps - 1 else last_active
        xa = x[:active]
        s = grid[t, :active].long()
        f = freq[s]
        emit = xa >= (f << (32 - k))  # x_max(s) = ((L >> k) << 16) * f
        emitted[t, :active] = _to_i16(xa & 0xFFFF)
        did[t, :active] = emit
        xa = torch.where(emit, xa >> 16, xa)
        x[:active] = (xa // f << k) + xa % f + cum[s]
    # Decoder reads lane j's words in increasing step order: lane-major concatenation.
    words = emitted.t()[did.t()]
    lane_words = did.sum(0)
    return RansStream(
        freq=freq.to(torch.int32),
        states=_to_i32(x),
        words=words,
        lane_words=lane_words.to(torch.int32),
        n=n,
        lanes=lanes,
        precision_bits=k,
    )


def decode(freq: Tensor, states: Tensor, words: Tensor, lane_words: Tensor, n: int, lanes: int,
           precision_bits: int, *, what: str = "rANS stream") -> Tensor:
    """Decode ``n`` symbols -> [n] uint8 on the device of ``states``.

    Raises ``CorruptPayloadError`` (naming ``what``) when the stream is inconsistent: bad table,
    word counts that do not add up, a lane that reads more or fewer words than it owns, or a lane
    whose final state is not ``L``.
    """
    device = states.device
    k = precision_bits
    if not MIN_PRECISION <= k <= MAX_PRECISION:
        raise CorruptPayloadError(f"{what}: precision_bits={k} is outside {MIN_PRECISION}..{MAX_PRECISION}")
    if lanes < 1 or n < 0:
        raise CorruptPayloadError(f"{what}: lanes={lanes}, n={n} are invalid (need lanes >= 1, n >= 0)")
    for name, t, dt, shape in (("freq", freq, torch.int32, None), ("states", states, torch.int32, (lanes,)),
                               ("words", words, torch.int16, None), ("lane_words", lane_words, torch.int32, (lanes,))):
        if t.dtype != dt or t.dim() != 1 or (shape is not None and tuple(t.shape) != shape):
            raise CorruptPayloadError(
                f"{what}: field {name!r} is {t.dtype} {list(t.shape)}, expected {dt} "
                f"{list(shape) if shape else '[*]'}"
            )
    alphabet = freq.numel()
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise CorruptPayloadError(f"{what}: frequency table has {alphabet} entries, expected 1..{MAX_ALPHABET}")
    m_total = 1 << k
    f64 = freq.to(device=device, dtype=torch.int64)
    lw = lane_words.to(device=device, dtype=torch.int64)
    wd = words.to(device)
    x = states.to(torch.int64) & _U32
    # One host sync for all table checks.
    checks = torch.stack([f64.sum(), (f64 < 0).sum(), lw.sum(), (lw < 0).sum(), (x < RANS_L).sum()]).tolist()
    if checks[0] != m_total or checks[1]:
        raise CorruptPayloadError(
            f"{what}: frequencies sum to {checks[0]} (negative entries: {checks[1]}), expected {m_total}; "
            "the payload is damaged"
        )
    if checks[2] != wd.numel() or checks[3]:
        raise CorruptPayloadError(
            f"{what}: lane word counts sum to {checks[2]} but the stream has {wd.numel()} words; "
            "the payload is damaged or truncated"
        )
    if checks[4]:
        raise CorruptPayloadError(
            f"{what}: {checks[4]} lane states are below the rANS lower bound; the payload is damaged"
        )
    steps = -(-n // lanes)
    # Per-slot tables: symbol, and (slot - cum[symbol], frequency) as one [M, 2] row per slot.
    sym_of_slot = torch.repeat_interleave(torch.arange(alphabet, device=device), f64, output_size=m_total)
    cum = torch.cumsum(f64, 0) - f64
    slot_tab = torch.stack([torch.arange(m_total, device=device) - cum[sym_of_slot], f64[sym_of_slot]], dim=1)
    sym_u8 = sym_of_slot.to(torch.uint8)
    ptr = torch.cumsum(lw, 0) - lw  # next word of each lane
    end = ptr + lw
    # A lane reads at most one word per step, so `steps` zero words past the end keep every read
    # in bounds even for a damaged stream; the final check then reports it.
    w64 = torch.zeros(wd.numel() + steps + 1, dtype=torch.int64, device=device)
    w64[: wd.numel()] = wd.to(torch.int64) & 0xFFFF
    out = torch.empty((steps, lanes), dtype=torch.uint8, device=device)
    mask_slot = m_total - 1
    last_active = n - (steps - 1) * lanes
    for t in range(steps):
        active = last_active if t == steps - 1 else lanes
        if active < lanes:
            xa, pa = x[:active], ptr[:active]
        else:
            xa, pa = x, ptr
        slot = xa & mask_slot
        torch.index_select(sym_u8, 0, slot, out=out[t, :active])
        tab = torch.index_select(slot_tab, 0, slot)  # [active, 2]
        xn = torch.addcmul(tab[:, 0], tab[:, 1], xa >> k)  # f * (x >> k) + slot - cum
        need = xn < RANS_L
        w = torch.index_select(w64, 0, pa)
        torch.where(need, (xn << 16).bitwise_or_(w), xn, out=xa)
        pa.add_(need)
    bad_state = int((x != RANS_L).sum())
    bad_words = int((ptr != end).sum())
    if bad_state or bad_words:
        raise CorruptPayloadError(
            f"{what}: after decoding, {bad_state} of {lanes} lanes did not return to the initial state and "
            f"{bad_words} lanes did not consume exactly their words; the payload is damaged"
        )
    return out.view(-1)[:n]
