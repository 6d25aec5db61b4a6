"""Interleaved rANS with a *per-symbol* choice among shared frequency tables, in pure PyTorch.

``thawed.codecs.rans`` codes one symbol sequence with one table stored in the stream. The neural
weight codec (``nwc``) needs something else: each latent symbol has its own distribution (one
learned table per latent channel and rate level), and the tables are stored once per file, not per
stream. This module is that coder; it keeps ``rans``'s conventions exactly (32-bit state in
``[L, 2**32)``, ``L = 2**16``, 16-bit renormalisation words, lane ``i % lanes`` / step
``i // lanes``, lanes start at ``L`` and must end there, words stored lane-major), so the same
integrity check catches corruption. What changes:

- ``tables``: ``[T, A]`` integer frequencies, each row summing to ``2**precision_bits`` and every
  entry >= 1 (any symbol can be coded), supplied by the caller (not stored in the stream);
- ``table_of``: ``[N]`` table index of every symbol, known to the decoder from side information.

Stream (``MultiStream``)::

    states:     [lanes] int32   # uint32 bit pattern: initial decoder state per lane
    words:      [W] int16       # uint16 bit pattern: lane 0's words in read order, then lane 1's ...
    lane_words: [lanes] int32   # words of each lane, sum == W

Lanes are independent streams decoded in parallel (vectorised across lanes); ``steps`` (symbols
per lane) trades the 8 bytes per lane of side information against the decoder's Python loop of
``steps`` iterations (~11 small torch ops each) -- on a GPU each iteration is a few kernel launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CodecError, CorruptPayloadError
from .rans import MAX_PRECISION, MIN_PRECISION, RANS_L

__all__ = ["MultiStream", "encode_multi", "decode_multi", "code_lengths", "check_tables"]


@dataclass(frozen=True)
class MultiStream:
    states: Tensor  # [lanes] int32
    words: Tensor  # [W] int16
    lane_words: Tensor  # [lanes] int32
    n: int
    lanes: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.states, self.words, self.lane_words))


def _to_i32(x: Tensor) -> Tensor:
    return ((x + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _to_i16(x: Tensor) -> Tensor:
    return ((x + (1 << 15)) % (1 << 16) - (1 << 15)).to(torch.int16)


def check_tables(tables: Tensor, precision_bits: int, *, what: str = "rANS tables") -> None:
    """Raise ``CorruptPayloadError`` unless every row is >= 1 and sums to ``2**precision_bits``."""
    if not MIN_PRECISION <= precision_bits <= MAX_PRECISION:
        raise CorruptPayloadError(f"{what}: precision_bits={precision_bits} is outside {MIN_PRECISION}..{MAX_PRECISION}")
    if tables.dim() != 2 or tables.shape[1] > 256 or tables.dtype.is_floating_point:
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
    a = tables.shape[1]
    f = tables.reshape(-1).to(torch.float64)[table_of.long() * a + symbols.long()]
    return precision_bits - torch.log2(f)


def encode_multi(symbols: Tensor, table_of: Tensor, tables: Tensor, precision_bits: int,
                 steps: int) -> MultiStream:
    """Entropy-code ``symbols`` ([N] in ``[0, A)``), symbol ``i`` with table ``table_of[i]``."""
    check_tables(tables, precision_bits)
    if steps < 1:
        raise CodecError(f"rANS steps per lane must be >= 1, got {steps}")
    sym = symbols.detach().reshape(-1).to("cpu", torch.int64)
    tid = table_of.detach().reshape(-1).to("cpu", torch.int64)
    n = sym.numel()
    if tid.numel() != n:
        raise CodecError(f"rANS: {n} symbols but {tid.numel()} table indices")
    a = tables.shape[1]
    if n and (int(sym.min()) < 0 or int(sym.max()) >= a or int(tid.min()) < 0 or int(tid.max()) >= tables.shape[0]):
        raise CodecError(f"rANS: symbols must lie in [0, {a}) and table indices in [0, {tables.shape[0]})")
    k = precision_bits
    freq = tables.to(torch.int64)
    cum = (torch.cumsum(freq, 1) - freq).reshape(-1)
    freq = freq.reshape(-1)
    lanes = max(1, -(-n // steps))
    steps = -(-n // lanes) if n else 0
    x = torch.full((lanes,), RANS_L, dtype=torch.int64)
    emitted = torch.zeros((steps, lanes), dtype=torch.int16)
    did = torch.zeros((steps, lanes), dtype=torch.bool)
    flat = torch.zeros(steps * lanes, dtype=torch.int64)
    flat[:n] = tid * a + sym
    grid = flat.view(steps, lanes)
    last_active = n - (steps - 1) * lanes if steps else 0
    for t in range(steps - 1, -1, -1):
        active = lanes if t < steps - 1 else last_active
        xa = x[:active]
        r = grid[t, :active]
        f = freq[r]
        emit = xa >= (f << (32 - k))
        emitted[t, :active] = _to_i16(xa & 0xFFFF)
        did[t, :active] = emit
        xa = torch.where(emit, xa >> 16, xa)
        x[:active] = (xa // f << k) + xa % f + cum[r]
    words = emitted.t()[did.t()]
    return MultiStream(states=_to_i32(x), words=words, lane_words=did.sum(0).to(torch.int32), n=n, lanes=lanes)


def decode_multi(states: Tensor, words: Tensor, lane_words: Tensor, table_of: Tensor, tables: Tensor,
                 precision_bits: int, *, what: str = "rANS stream") -> Tensor:
    """Decode ``table_of.numel()`` symbols -> [N] uint8 on the device of ``states``.

    ``tables`` must already be checked (``check_tables``). Raises ``CorruptPayloadError`` naming
    ``what`` when the word counts do not add up, a state is out of range, or after decoding a lane
    did not return to ``L`` / did not read exactly its own words.
    """
    device = states.device
    k = precision_bits
    n = table_of.numel()
    lanes = states.numel()
    m_total = 1 << k
    lw = lane_words.to(torch.int64)
    x = states.to(torch.int64) & 0xFFFFFFFF
    checks = torch.stack([lw.sum(), (lw < 0).sum(), (x < RANS_L).sum()]).tolist()
    if checks[0] != words.numel() or checks[1]:
        raise CorruptPayloadError(
            f"{what}: lane word counts sum to {checks[0]} but the stream has {words.numel()} words; "
            "the payload is damaged or truncated"
        )
    if checks[2]:
        raise CorruptPayloadError(f"{what}: {checks[2]} lane states are below the rANS lower bound; the payload is damaged")
    if lanes < 1 or lanes > max(1, n):
        raise CorruptPayloadError(f"{what}: {lanes} lanes for {n} symbols; the payload is damaged")
    # Only the tables this stream uses: [U, A] -> slot tables [U * M].
    used, local = torch.unique(table_of.reshape(-1).to(device=device, dtype=torch.int64), return_inverse=True)
    f64 = tables.to(device=device, dtype=torch.int64)[used]  # [U, A]
    u, a = f64.shape
    sym_of_slot = torch.repeat_interleave(torch.arange(a, device=device).repeat(u), f64.reshape(-1),
                                          output_size=u * m_total)
    cum = (torch.cumsum(f64, 1) - f64).reshape(-1)
    row_of_slot = torch.repeat_interleave(torch.arange(u * a, device=device), f64.reshape(-1), output_size=u * m_total)
    slot_in_table = torch.arange(m_total, device=device).repeat(u)
    slot_tab = torch.stack([slot_in_table - cum[row_of_slot], f64.reshape(-1)[row_of_slot]], 1)  # [U*M, 2]
    sym_u8 = sym_of_slot.to(torch.uint8)
    steps = -(-n // lanes) if n else 0
    base = torch.zeros(steps * lanes, dtype=torch.int64, device=device)
    base[:n] = local * m_total
    base = base.view(steps, lanes)
    ptr = torch.cumsum(lw, 0) - lw
    end = ptr + lw
    w64 = torch.zeros(words.numel() + steps + 1, dtype=torch.int64, device=device)
    w64[: words.numel()] = words.to(torch.int64) & 0xFFFF
    out = torch.empty((steps, lanes), dtype=torch.uint8, device=device)
    mask = m_total - 1
    last_active = n - (steps - 1) * lanes if steps else 0
    for t in range(steps):
        active = last_active if t == steps - 1 else lanes
        xa, pa = (x[:active], ptr[:active]) if active < lanes else (x, ptr)
        row = (xa & mask).add_(base[t, :active])
        torch.index_select(sym_u8, 0, row, out=out[t, :active])
        tab = torch.index_select(slot_tab, 0, row)
        xn = torch.addcmul(tab[:, 0], tab[:, 1], xa >> k)
        need = xn < RANS_L
        w = torch.index_select(w64, 0, pa)
        torch.where(need, (xn << 16).bitwise_or_(w), xn, out=xa)
        pa.add_(need)
    bad = torch.stack([(x != RANS_L).sum(), (ptr != end).sum()]).tolist()
    if bad[0] or bad[1]:
        raise CorruptPayloadError(
            f"{what}: after decoding, {bad[0]} of {lanes} lanes did not return to the initial state and "
            f"{bad[1]} lanes did not consume exactly their words; the payload is damaged"
        )
    return out.view(-1)[:n]
