"""Bit packing of small unsigned integer codes (1-8 bits) into bytes, in pure PyTorch.

Layout (LSB first): codes are taken in groups of 8; a group of 8 ``b``-bit codes is the
``8*b``-bit little-endian integer ``sum(code[j] << (b*j))``, stored as ``b`` bytes. The input is
padded with zero codes to a multiple of 8, so ``packed_nbytes(n, b) == ceil(n / 8) * b``
(8-bit codes are stored one per byte, unpadded: ``packed_nbytes(n, 8) == n``).
Works on any device (int64 shifts only); exact round trip for every width 1..8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CodecError

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes used by ``count`` codes of ``bits`` bits."""
    _check_bits(bits)
    return count if bits == 8 else (count + 7) // 8 * bits


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise CodecError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack a tensor of integer codes in ``[0, 2**bits)`` into a flat uint8 tensor.

    codes: any shape, integer dtype -> packed: [ceil(numel/8) * bits] uint8
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        raise CodecError("pack_bits needs integer codes")
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise CodecError(f"codes out of range for {bits}-bit packing: [{int(flat.min())}, {int(flat.max())}]")
    if bits == 8:
        return flat.to(torch.uint8).contiguous()
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=flat.device)
    padded[:n] = flat.to(torch.int64)
    padded = padded.view(groups, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    word = (padded << shifts).sum(dim=1)  # [groups] int64, 8*bits <= 56 bits used
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(1) >> byte_shifts) & 0xFF  # [groups, bits]
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack_bits``: packed [ceil(count/8)*bits] uint8 -> codes [count] uint8."""
    _check_bits(bits)
    need = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise CodecError(
            f"packed codes have {packed.numel()} bytes of {packed.dtype}, expected {need} uint8 bytes "
            f"for {count} codes of {bits} bits"
        )
    if bits == 8:
        return packed
    groups = need // bits
    by = packed.view(groups, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (by << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)
