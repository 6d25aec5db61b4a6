"""numba kernel behind ``Rtn.decode``'s CPU fast path, every code width (importing this module
needs numba).

Codes are ``bitpack``'s LSB-first stream over the row-major weights: code ``i`` occupies bits
``i*bits .. i*bits+bits-1`` of the little-endian byte string, so a code may span two bytes. The
PyTorch path unpacks the codes in one pass (for widths not dividing 8 by gathering both bytes of
every code as int16: about 0.55 GB/s of fp32 on one thread here) and scales them in another; this
pass reads each code where it lies and writes ``q * scale + offset`` in float32 (a multiply then an
add, as ``torch.addcmul`` computes it: equal bit for bit, tested), about 2.4 GB/s at 3 bits. At 4
bits too it is faster: the whole SmolLM2 rtn b4 model on two worker threads decoded at 1.71-2.52
GB/s against 1.35-1.41 for the PyTorch path, alternating on the quiet machine
(``benchmarks/decode_speed.py out/rtn4 --threads 2 --workers 2``). A process that decodes rtn
imports numba (0.5 s); rtn b4 running direct (the CPU default) repacks and never decodes.
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
