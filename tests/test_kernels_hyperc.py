"""``hyperc`` Triton kernels against the pure-PyTorch reference: decode of every configuration
(odd shapes, partial groups and vectors, non-power-of-two ``points``, 16-bit indices), output
poisoned with NaN first, and the fused 1-D decode-matmul for 1..16 rows (and its fallbacks).

On CUDA the kernels run natively; without it under ``TRITON_INTERPRET=1`` (conftest) on CPU
tensors, by calling the kernel functions directly (``HyperC.decode`` keeps the reference on the CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thawed.codecs import CodecError, CorruptPayloadError, EncodeContext, Encoded, TensorSpec
from thawed.codecs.hyperc import HyperC, hyperc_decode_reference
from thawed.codecs.kernels import interpreting, kernels_available

pytest.importorskip("triton")
from thawed.codecs.kernels import hyperc as kh  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not (interpreting() and kernels_available("cpu")),
                                                 reason="the CPU runs kernels only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]
SHAPES = [(1, 7), (17, 100), (33, 257)]
CONFIGS = [  # (dim, index_bits, group_size, points): every stream width, aligned and unaligned groups
    (1, 4, 32, None), (1, 3, 64, None), (2, 6, 64, None), (2, 11, 0, 1600), (3, 10, 48, None),
    (3, 13, 195, None), (4, 13, 32, None), (2, 16, 128, None), (1, 8, 24, 200), (1, 2, 40, None),
]


def _encode(shape: tuple[int, ...], seed: int, **opts) -> tuple[Encoded, TensorSpec]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05 + 0.01
    spec = TensorSpec("t.weight", tuple(shape), torch.float32, "linear")
    return HyperC(clip_search=False, **opts).encode(w, spec, EncodeContext("t.weight")), spec


def _ref(enc: Encoded, spec: TensorSpec) -> torch.Tensor:
    return HyperC.decode(enc, spec, {}, torch.device("cpu"), torch.float32, fast=False)


def _fp32_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32 round-off only: CUDA contracts x*scale+offset into an FMA (measured 4e-7 on ~3).
    atol = 1e-6 * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_decode_matches_reference(device: str, shape: tuple[int, int], cfg: tuple) -> None:
    dim, bits, g, points = cfg
    enc, spec = _encode(shape, hash((shape, cfg)) % 2**31, dim=dim, index_bits=bits, group_size=g, points=points)
    ref = _ref(enc, spec)
    dev_enc = enc.to(device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        got = kh.decode(dev_enc, spec, dtype, out=out)
        assert got is out and got.dtype == dtype and torch.isfinite(got).all()
        if dtype == torch.float32:
            _fp32_close(got, ref)
            if device == "cpu":  # no FMA under the interpreter: bit-equal to the plain reference
                assert torch.equal(got, hyperc_decode_reference(enc, shape))
        else:
            torch.testing.assert_close(got.cpu().float(), ref.to(dtype).float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 40), ()], ids=str)
def test_decode_other_ranks(device: str, shape: tuple[int, ...]) -> None:
    enc, spec = _encode(shape, 1, dim=3, index_bits=11, group_size=24)
    got = kh.decode(enc.to(device), spec, torch.float32)
    assert got.shape == shape
    _fp32_close(got, _ref(enc, spec))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_wide_products(device: str) -> None:
    """``points`` not a power of two with 16-bit indices: the product k*z needs int64."""
    enc, spec = _encode((3, 50), 2, dim=2, index_bits=16, group_size=10, points=40000)
    _fp32_close(kh.decode(enc.to(device), spec, torch.float32), _ref(enc, spec))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_int64_row_math(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path of tensors past 2**31 stream bits or output elements, forced on small ones."""
    monkeypatch.setattr(kh, "FORCE_INT64", True)
    for cfg in ((1, 4, 32, None), (1, 4, 16, None), (3, 11, 24, None), (2, 11, 0, 1600)):
        shape = (9, 80 if cfg[2] == 16 else 77)  # 80 x 4 bits: whole-byte rows, the byte kernel
        enc, spec = _encode(shape, 7, dim=cfg[0], index_bits=cfg[1], group_size=cfg[2], points=cfg[3])
        _fp32_close(kh.decode(enc.to(device), spec, torch.float32), _ref(enc, spec))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_refuses_indices_beyond_points(device: str) -> None:
    enc, spec = _encode((4, 30), 3, dim=2, index_bits=11, group_size=0, points=1600)
    bad = Encoded({**enc.fields, "codes_hi": torch.full_like(enc.fields["codes_hi"], 0xFF)}, enc.params)
    with pytest.raises(CorruptPayloadError, match="beyond points=1600"):
        kh.decode(bad.to(device), spec, torch.float32)
    enc1, spec1 = _encode((4, 30), 3, dim=1, index_bits=8, group_size=8, points=200)
    bad1 = Encoded({**enc1.fields, "codes_lo": torch.full_like(enc1.fields["codes_lo"], 0xFF)}, enc1.params)
    with pytest.raises(CorruptPayloadError, match="beyond points=200"):
        kh.prepare(bad1.to(device), spec1)
    with pytest.raises(CorruptPayloadError, match="beyond points=200"):
        kh.decode(bad1.to(device), spec1, torch.bfloat16)
    with pytest.raises(CodecError, match="out must be"):
        kh.decode(enc.to(device), spec, torch.float32, out=torch.empty(4, 31, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_codec_decode_uses_the_kernel_on_cuda() -> None:
    enc, spec = _encode((33, 300), 4, dim=3, index_bits=13, group_size=192)
    cuda = torch.device("cuda")
    fast = HyperC.decode(enc, spec, {}, cuda, torch.bfloat16)
    ref = HyperC.decode(enc, spec, {}, cuda, torch.bfloat16, fast=False)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    g = torch.cuda.CUDAGraph()  # capturable: no host sync on the hot path
    out = torch.empty(spec.shape, dtype=torch.bfloat16, device=cuda)
    dev_enc = enc.to(cuda)
    kh.decode(dev_enc, spec, torch.bfloat16, out=out)
    with torch.cuda.graph(g):
        kh.decode(dev_enc, spec, torch.bfloat16, out=out)
    out.fill_(float("nan"))
    g.replay()
    torch.testing.assert_close(out.float(), fast.float(), rtol=0, atol=0)


MM_CONFIGS = [(1, 4, 64), (1, 3, 32), (1, 5, 24), (1, 8, 16), (1, 7, 144), (1, 1, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", MM_CONFIGS, ids=str)
def test_fused_matmul_matches_linear(device: str, cfg: tuple) -> None:
    dim, bits, g = cfg
    N, n = (37, 100) if bits != 4 else (70, 203)
    enc, spec = _encode((N, n), bits * 31 + g, dim=dim, index_bits=bits, group_size=g)
    w32 = _ref(enc, spec)
    fw = kh.prepare(enc.to(device), spec)
    assert fw.reason is None and fw.planes
    assert fw.nbytes <= enc.nbytes + N * bits  # the stored size, plus column padding to 8
    gen = torch.Generator().manual_seed(bits)
    rows = (1, 3, 9, 16, 17) if bits in (4, 3) else (1, 12)
    for M in rows:
        x32 = torch.randn(M, n, generator=gen)
        ref = F.linear(x32, w32)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = x32.to(dtype)
            y = kh.matmul(x.to(device), fw)
            assert y.shape == (M, N) and y.dtype == dtype and torch.isfinite(y).all()
            exact = F.linear(x.float(), w32)
            scale = float(exact.abs().max())
            if dtype == torch.float32:
                torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=2e-5 * scale)
            else:  # within the output's rounding (plus the decoded weight's, on the tl.dot path)
                torch.testing.assert_close(y.cpu().float(), exact, rtol=2 ** -6, atol=2 ** -7 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_batched_shape_and_fallbacks(device: str) -> None:
    enc, spec = _encode((24, 48), 5, dim=1, index_bits=4, group_size=16)
    fw = kh.prepare(enc.to(device), spec)
    x = torch.randn(2, 3, 48)
    y = kh.matmul(x.to(device), fw)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.cpu(), F.linear(x, _ref(enc, spec)), rtol=1e-4, atol=1e-5)
    # dim > 1: no fused form; decodes per call (kernel) and runs F.linear
    enc2, spec2 = _encode((24, 48), 6, dim=2, index_bits=8, group_size=16)
    fw2 = kh.prepare(enc2.to(device), spec2)
    assert fw2.reason and "dim=2" in fw2.reason and fw2.nbytes == enc2.nbytes
    torch.testing.assert_close(kh.matmul(x.to(device), fw2).cpu(), F.linear(x, _ref(enc2, spec2)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(CodecError, match="features"):
        kh.matmul(torch.randn(1, 47, device=device), fw)


def test_bench_case_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU benchmark's payload: 4.5 bpw; a big matrix is an encoded slab repeated down the rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_case_hyperc.py"
    mod_spec = importlib.util.spec_from_file_location("gpu_case_hyperc", path)
    case = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(case)
    assert case.NAME == "hyperc"
    monkeypatch.setattr(case, "FULL_ENCODE_MAX", 0)
    enc, spec, shared = case.payload((136, 40), torch.device("cpu"))
    assert spec.shape == (136, 40) and enc.nbytes * 8 / spec.numel == pytest.approx(4.5 + 32 * (1 / 40 - 1 / 64))
    w = _ref(enc, spec)
    assert torch.equal(w[64:128], w[:64]) and not torch.equal(w[128:], w[:8])
    if interpreting():
        torch.testing.assert_close(kh.decode(enc, spec, torch.float32), w)
