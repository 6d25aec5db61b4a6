"""Bit packing: exact round trips for every width, the documented byte layout, and clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thawed.codecs import CodecError
from thawed.codecs.bitpack import pack_bits, packed_nbytes, unpack_bits

LENGTHS = (0, 1, 7, 9, 1023)


def _numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout, written independently: one LSB-first bit stream, code i at bit i*bits."""
    n = codes.size
    stream = np.zeros(((n + 7) // 8) * 8 * bits, dtype=np.uint8)
    for t in range(bits):
        stream[np.arange(n) * bits + t] = (codes >> t) & 1
    packed = np.packbits(stream, bitorder="little")
    return packed[:n] if bits == 8 else packed


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_every_width(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes.to(torch.uint8))
    assert np.array_equal(packed.numpy(), _numpy_pack(codes.numpy().astype(np.uint8), bits))


@pytest.mark.parametrize("bits", range(1, 9))
def test_extremes_and_input_dtypes(bits: int) -> None:
    top = (1 << bits) - 1
    codes = torch.tensor([0, top, top, 0, top, 1 % (top + 1), top, top, 0], dtype=torch.uint8)
    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(unpack_bits(pack_bits(codes.to(dt), bits), bits, codes.numel()), codes)
    # any shape is flattened row-major
    grid = torch.arange(12).reshape(3, 4) % (top + 1)
    assert torch.equal(unpack_bits(pack_bits(grid, bits), bits, 12), grid.reshape(-1).to(torch.uint8))


def test_golden_bytes() -> None:
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21, 0, 0, 0]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [0b10001101]
    # 3-bit: codes 7,0,5 -> bits 111 000 101 (LSB first) -> 0b01000111, 0b00000001
    assert pack_bits(torch.tensor([7, 0, 5]), 3).tolist() == [0x47, 0x01, 0x00]
    assert pack_bits(torch.tensor([200, 3]), 8).tolist() == [200, 3]
    assert packed_nbytes(9, 3) == 6 and packed_nbytes(9, 8) == 9 and packed_nbytes(0, 5) == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_out_of_range_codes_raise(bits: int) -> None:
    with pytest.raises(CodecError, match="out of range"):
        pack_bits(torch.tensor([0, 1 << bits]), bits)
    with pytest.raises(CodecError, match="out of range"):
        pack_bits(torch.tensor([-1, 0]), bits)


def test_bad_inputs_raise() -> None:
    with pytest.raises(CodecError, match="integer codes"):
        pack_bits(torch.tensor([0.0, 1.0]), 4)
    for bad in (0, 9, 2.0):
        with pytest.raises(CodecError, match="bit width"):
            pack_bits(torch.tensor([0]), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", range(1, 9))
def test_wrong_packed_length_raises(bits: int) -> None:
    packed = pack_bits(torch.zeros(9, dtype=torch.int64), bits)
    with pytest.raises(CodecError, match="expected"):
        unpack_bits(packed[:-1], bits, 9)
    with pytest.raises(CodecError, match="expected"):
        unpack_bits(torch.cat([packed, packed[:1]]), bits, 9)
    with pytest.raises(CodecError, match="uint8"):
        unpack_bits(packed.to(torch.int16), bits, 9)
