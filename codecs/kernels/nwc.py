"""``nwc`` decode on the device: the rANS latent lanes in the Triton lane decoder (``kernels.rans``),
the decoder MLP as batched matmuls over all chunks, then the row scales -- no host round trip of
the symbols.

The table of symbol ``i`` (latent channel ``i % 16`` of a chunk in column ``i // P``) is computed in
the kernel from a [cols] column -> local level map, so no [n] table index is built; the slot table
covers only the rate indices the tensor uses (``U * 16 * 2**precision_bits`` int64 entries, e.g.
3 levels at precision 14: 6 MB, in L2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import Encoded, SharedState, TensorSpec
from ..errors import CodecError
from ..nwc import DECODE_BLOCK_GPU, Nwc
from ..nwc_net import CHUNK, decode_chunks
from . import rans as krans

__all__ = ["decode"]


def decode(enc: Encoded, spec: TensorSpec, dtype: torch.dtype, out: Tensor | None = None,
           shared: SharedState | None = None, check: bool = True) -> Tensor:
    """``Nwc.decode`` on the payload's device -> ``spec.shape`` in ``dtype`` (symbols bit-exact,
    values to float round-off: the MLP runs per chunk instead of per rate-index group).

    ``shared``: the file's nwc shared state (required). ``check=True`` verifies the rANS stream
    (one host sync); the level and table checks of the reference are always done (two small syncs).
    """
    if shared is None:
        raise CodecError(f"tensor {spec.name!r}: nwc decode needs the file's shared state")
    dev = enc.fields["states"].device if "states" in enc.fields else torch.device("cpu")  # else: checked below
    f = Nwc.checked_fields(enc, spec, dev)
    prm = enc.params
    rows, cols, k_bits = prm["rows"], prm["cols"], prm["precision_bits"]
    p = -(-rows // CHUNK) * CHUNK
    lv, used = Nwc.levels_used(f, spec, prm)
    dec, tables = Nwc._shared(spec, shared, prm, used, dev)  # tables [grid * 16, 256] int32, used rows checked
    used_t = torch.tensor(used, dtype=torch.int64, device=dev)
    sub = tables.index_select(0, (used_t[:, None] * CHUNK + torch.arange(CHUNK, device=dev)).reshape(-1))
    local = torch.zeros(prm["grid"], dtype=torch.int32, device=dev)
    local[used_t] = torch.arange(len(used), dtype=torch.int32, device=dev)
    col_table = local[lv]  # [cols] int32: local level of each column
    n = cols * p
    sym = krans.decode_symbols(f["states"], f["words"], f["lane_words"], sub, k_bits, n, column_table=col_table,
                               period=p, check=check, what=f"tensor {spec.name!r} nwc latents")
    sym = sym.view(-1, CHUNK)  # [cols * P / 16, 16] uint8
    kk = lv.repeat_interleave(p // CHUNK, output_size=sym.shape[0])  # [chunks] rate index
    chunks = torch.empty(sym.shape[0], CHUNK, dtype=torch.float32, device=dev)
    for s in range(0, sym.shape[0], DECODE_BLOCK_GPU):
        chunks[s:s + DECODE_BLOCK_GPU] = decode_chunks(dec, sym[s:s + DECODE_BLOCK_GPU], kk[s:s + DECODE_BLOCK_GPU])
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=dev)
    elif out.dtype != dtype or tuple(out.shape) != tuple(spec.shape) or out.device != dev:
        raise CodecError(f"tensor {spec.name!r}: out must be a {dtype} {list(spec.shape)} tensor on {dev}")
    # transpose, row scale (in float32) and the cast to dtype in one pass
    return torch.mul(chunks.view(cols, p)[:, :rows].t(), f["row_scale"].to(torch.float32)[:, None], out=out)
