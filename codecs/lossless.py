"""``lossless``: bit-exact float compression by entropy-coding the exponent (DFloat11 / ZipNN idea).

Each value's bits are split into its exponent field, which carries little information in trained
weights (a few bits of entropy out of 8) and is rANS-coded (``thawed.codecs.rans``), and the
sign + mantissa bits, which are close to random and are stored as they are:

=========  ========  ==============================================================
dtype      exponent  sign + mantissa (raw)
=========  ========  ==============================================================
float32    8 bits    24 bits: ``rest`` [3, n] uint8 byte planes (low byte first) of
                     ``sign << 23 | mantissa``
bfloat16   8 bits    8 bits: ``rest`` [n] uint8 = ``sign << 7 | mantissa``
float16    5 bits    11 bits: ``rest`` [n] uint8 = mantissa & 0xFF, and
                     ``rest_hi`` pack_bits(``sign << 2 | mantissa >> 8``, 3)
=========  ========  ==============================================================

Fields (``n`` = numel, ``A`` = 256 or 32 exponent symbols, ``lanes``/``n_words`` from params)::

    exp_freq:       [A] int32
    exp_states:     [lanes] int32
    exp_words:      [n_words] int16
    exp_lane_words: [lanes] int32
    rest:           [3, n] | [n] uint8
    rest_hi:        [ceil(n/8) * 3] uint8     # float16 only

Params: ``{"n", "lanes", "precision_bits", "n_words"}``; the original dtype is ``spec.dtype``.
Decode returns the original values bit for bit (NaN payloads, infinities, subnormals and -0.0
included) when asked for the original dtype, otherwise those values cast to the requested dtype.

Quality floor: exact (SQNR = inf). Rate on MiniLM-L6's 2-D fp32 weights (22.7 M): 26.74 bits/weight
(exponent ~2.6 bits + 24 raw + table/lane overhead); the same weights cast to bf16: 10.74, fp16: 13.72.
Decode cost per weight: one rANS step plus ~6 integer ops to reassemble the bits. On the CPU both
run compiled (``rans_numba``: the rANS lanes, then the float32 reassembly, on the same GIL-free
threads): the whole SmolLM2-135M (134.5 M fp32 weights) in ~1.3 s on 2 loaded cores, ~420 MB/s
(``benchmarks/decode_speed.py``); the pure-PyTorch reference took 11.1 s on 1 thread. On CUDA with
Triton, one kernel decodes the exponent lanes and assembles the floats (``kernels.lossless``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import rans, rans_numba
from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params,
                   check_nonfinite_flag, check_param)
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .errors import CodecError
from .kernels import kernels_available

__all__ = ["Lossless"]

# dtype -> (integer view dtype, exponent bits, mantissa bits)
_LAYOUT: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 8, 23),
    torch.bfloat16: (torch.int16, 8, 7),
    torch.float16: (torch.int16, 5, 10),
}
_MAX_N = 1 << 40


def _layout(spec: TensorSpec) -> tuple[torch.dtype, int, int]:
    lay = _LAYOUT.get(spec.dtype)
    if lay is None:
        raise CodecError(
            f"tensor {spec.name!r}: codec 'lossless' handles float32, bfloat16 and float16, not {spec.dtype}; "
            "store this tensor with 'raw'"
        )
    return lay


class Lossless(Codec, name="lossless", version=1):
    """Bit-exact: rANS-coded exponents plus raw sign/mantissa bits."""

    def __init__(self, precision_bits: int = rans.DEFAULT_PRECISION) -> None:
        if (isinstance(precision_bits, bool) or not isinstance(precision_bits, int)
                or not rans.MIN_PRECISION <= precision_bits <= rans.MAX_PRECISION):
            raise CodecError(
                f"codec 'lossless' option 'precision_bits' must be an integer in "
                f"{rans.MIN_PRECISION}..{rans.MAX_PRECISION}, got {precision_bits!r}"
            )
        self.precision_bits = precision_bits

    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        idt, ebits, mbits = _layout(spec)
        if weight.dtype != spec.dtype or tuple(weight.shape) != tuple(spec.shape):
            raise CodecError(
                f"tensor {spec.name!r}: weight is {weight.dtype} {list(weight.shape)} but the spec says "
                f"{spec.dtype} {list(spec.shape)}; lossless stores the source dtype unchanged"
            )
        raw = weight.detach().to("cpu").contiguous().reshape(-1)
        n = raw.numel()
        if spec.dtype == torch.float32:
            # Byte-wise on the little-endian bytes: exponent = bits 23..30; the rest is bytes 0, 1
            # and (byte 2 without its exponent bit) | sign. uint8 work keeps peak memory ~3n bytes.
            by = raw.view(torch.uint8).view(n, 4)
            exp = ((by[:, 3] & 0x7F) << 1) | (by[:, 2] >> 7)
            freq = rans.fit_table(exp, 1 << ebits, self.precision_bits)
            stream = rans.encode(exp, freq, self.precision_bits)
            del exp
            rest = torch.empty((3, n), dtype=torch.uint8)
            rest[0] = by[:, 0]
            rest[1] = by[:, 1]
            rest[2] = (by[:, 2] & 0x7F) | (by[:, 3] & 0x80)
            return Encoded(self._stream_fields(freq, stream) | {"rest": rest}, self._params(stream))
        u = raw.view(idt).to(torch.int32) & 0xFFFF
        exp = (u >> mbits) & ((1 << ebits) - 1)
        sign = u >> (mbits + ebits)
        mant = u & ((1 << mbits) - 1)
        freq = rans.fit_table(exp, 1 << ebits, self.precision_bits)
        stream = rans.encode(exp, freq, self.precision_bits)
        fields = self._stream_fields(freq, stream)
        if spec.dtype == torch.bfloat16:
            fields["rest"] = ((sign << 7) | mant).to(torch.uint8)  # [n]
        else:
            fields["rest"] = (mant & 0xFF).to(torch.uint8)  # [n]
            fields["rest_hi"] = pack_bits((sign << 2) | (mant >> 8), 3)  # [ceil(n/8)*3]
        return Encoded(fields, self._params(stream))

    @staticmethod
    def _stream_fields(freq: Tensor, stream: rans.RansStream) -> dict[str, Tensor]:
        return {"exp_freq": freq, "exp_states": stream.states, "exp_words": stream.words,
                "exp_lane_words": stream.lane_words}

    def _params(self, stream: rans.RansStream) -> dict[str, Any]:
        return {"n": stream.n, "lanes": stream.lanes, "precision_bits": self.precision_bits,
                "n_words": int(stream.words.numel())}

    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("n", "lanes", "precision_bits", "n_words", "nonfinite"))
        check_nonfinite_flag(cls.name, spec.name, params)
        _, ebits, _ = _layout(spec)
        n = check_param(cls.name, spec.name, params, "n", int, 0, _MAX_N)
        if n != spec.numel:
            raise CodecError(
                f"tensor {spec.name!r}: codec 'lossless' param 'n'={n} but the tensor has {spec.numel} values; "
                "the index is damaged"
            )
        lanes = check_param(cls.name, spec.name, params, "lanes", int, 1, max(1, n))
        check_param(cls.name, spec.name, params, "precision_bits", int, rans.MIN_PRECISION, rans.MAX_PRECISION)
        steps = -(-n // lanes)
        n_words = check_param(cls.name, spec.name, params, "n_words", int, 0, steps * lanes)
        out = {
            "exp_freq": FieldSpec(torch.int32, (1 << ebits,)),
            "exp_states": FieldSpec(torch.int32, (lanes,)),
            "exp_words": FieldSpec(torch.int16, (n_words,)),
            "exp_lane_words": FieldSpec(torch.int32, (lanes,)),
        }
        if spec.dtype == torch.float32:
            out["rest"] = FieldSpec(torch.uint8, (3, n))
        else:
            out["rest"] = FieldSpec(torch.uint8, (n,))
        if spec.dtype == torch.float16:
            out["rest_hi"] = FieldSpec(torch.uint8, (packed_nbytes(n, 3),))
        return out

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype, entropy_on_cpu: bool | None = None,
               rans_backend: str = "auto", fast: bool | None = None) -> Tensor:
        """``fast`` (default: on CUDA when the Triton kernels are available and neither
        ``entropy_on_cpu`` nor ``rans_backend`` asks otherwise): the one-pass Triton kernel
        (``kernels.lossless``: exponent lanes fused with the float assembly, same bits); ``False``
        keeps the path below, the reference.

        ``entropy_on_cpu`` (default: when decoding on a GPU without the kernel): decode the rANS exponent stream on
        the host, then assemble the bits on the device. rANS is a loop of small sequential steps
        that a GPU runs slower than a CPU (H200: 0.40 s vs 0.19 s on 16 host threads for 3.5 M
        weights, with the torch reference on both); the exponents are identical either way.
        ``rans_backend``: ``rans.decode``'s (``auto``: compiled on the CPU when numba imports, and
        then float32 bits are reassembled by a compiled kernel too; ``torch``: the pure-PyTorch
        reference for both)."""
        dev = torch.device(device)
        if fast is None:
            fast = (dev.type == "cuda" and not entropy_on_cpu and rans_backend == "auto"
                    and dtype in _LAYOUT and kernels_available(dev))
        if fast:
            from .kernels import lossless as klossless

            _layout(spec)
            return klossless.decode(enc.to(dev), spec, dtype)
        f = cls.checked_fields(enc, spec, dev)
        idt, ebits, mbits = _layout(spec)
        p = enc.params
        if entropy_on_cpu is None:
            entropy_on_cpu = dev.type != "cpu"
        ent = torch.device("cpu") if entropy_on_cpu else dev
        exp = rans.decode(*(f[k].to(ent) for k in ("exp_states", "exp_words", "exp_lane_words", "exp_freq")),
                          p["precision_bits"], p["n"], what=f"tensor {spec.name!r} exponents", backend=rans_backend)
        if (spec.dtype == torch.float32 and dev.type == "cpu" and exp.device.type == "cpu"
                and rans_backend != "torch" and rans_numba.available()):
            # compiled, in the rANS decoder's threads; the torch code below is its reference
            return rans_numba.assemble_f32(exp, f["rest"]).reshape(spec.shape).to(dtype)
        e = exp.to(dev, torch.int32)
        if spec.dtype == torch.float32:
            r = f["rest"].to(torch.int32)
            rest = r[0] | (r[1] << 8) | (r[2] << 16)
            # sign into bit 31: int32 arithmetic wraps, giving the intended bit pattern.
            bits = ((rest >> 23) << 31) | (e << 23) | (rest & 0x7FFFFF)
            value = bits.view(torch.float32)
        elif spec.dtype == torch.bfloat16:
            rest = f["rest"].to(torch.int32)
            bits = ((rest >> 7) << 15) | (e << 7) | (rest & 0x7F)
            value = _to_i16(bits).view(torch.bfloat16)
        else:
            hi = unpack_bits(f["rest_hi"], 3, p["n"]).to(torch.int32)
            bits = ((hi >> 2) << 15) | (e << 10) | ((hi & 3) << 8) | f["rest"].to(torch.int32)
            value = _to_i16(bits).view(torch.float16)
        return value.reshape(spec.shape).to(dtype)


def _to_i16(bits: Tensor) -> Tensor:
    """int32 holding a 16-bit pattern -> int16 with that pattern."""
    return (bits - ((bits & 0x8000) << 1)).to(torch.int16)
