"""numba kernel behind ``Rtn.decode``'s CPU fast path for code widths that do not divide 8 (3, 5, 6,
7 bits; importing this module needs numba).

Codes are ``bitpack``'s LSB-first stream over the row-major weights: code ``i`` occupies bits
``i*bits .. i*bits+bits-1`` of the little-endian byte string, so a code may span two bytes. The
PyTorch path gathers both bytes of every code as int16 and shifts (about 0.55 GB/s of fp32 on one
thread here); this pass reads each code where it lies and writes ``q * scale + offset`` in float32
(a multiply then an add, as ``torch.addcmul`` computes it: equal bit for bit, tested), about 2.4
GB/s. Widths dividing 8 stay on the PyTorch path, which is within 1.2-1.6x of this one there and
needs no numba import (0.5 s per process).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit("void(uint8[::1], float32[:, ::1], float32[:, ::1], int64, int64, float32[:, ::1])", cache=True, nogil=True)
def decode(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int, group: int,
           out: np.ndarray) -> None:
    """codes [packed] u8, scale/offset [m, G] f32 -> out [m, n] f32 (n = out.shape[1])."""
    m, n = out.shape
    groups = scale.shape[1]
    mask = (1 << bits) - 1
    for r in range(m):
        for gi in range(groups):
            s = scale[r, gi]
            o = offset[r, gi]
            c0 = gi * group
            for c in range(c0, min(n, c0 + group)):
                bit = (r * n + c) * bits
                byte = bit >> 3
                sh = bit & 7
                v = np.int64(codes[byte])
                if sh + bits > 8:
                    v |= np.int64(codes[byte + 1]) << 8
                out[r, c] = np.float32((v >> sh) & mask) * s + o
