"""``kernels/rtn.py`` against ``Rtn.decode`` (the reference): decode bit-exact in float32 up to FMA
round-off on odd shapes and every width, and the fused matmul against ``x @ W^T`` in float32.

On the CPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets TRITON_INTERPRET),
called directly; on CUDA the same tests run natively. Shapes stay tiny: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from thawed.codecs import EncodeContext, Encoded, TensorSpec  # noqa: E402
from thawed.codecs.kernels import kernels_available  # noqa: E402
from thawed.codecs.rtn import Rtn  # noqa: E402

DEVICES = [pytest.param("cpu", id="cpu-interpreter"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    dev = torch.device(request.param)
    if not kernels_available(dev):
        pytest.skip(f"Triton kernels are not available on {dev}")
    return dev


def _payload(shape: tuple[int, ...], bits: int, g: int, seed: int, device: torch.device) -> tuple[Encoded, TensorSpec]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05 + 0.01
    spec = TensorSpec("t.weight", tuple(shape), torch.float32, "linear")
    return Rtn(bits=bits, group_size=g).encode(w, spec, EncodeContext("t.weight")).to(device), spec


def _kernels():
    from thawed.codecs.kernels import rtn
    return rtn


def _reference(enc: Encoded, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    return Rtn.decode(enc.to("cpu"), spec, {}, torch.device("cpu"), dtype, fast=False)


DECODE_CASES = [((1, 7), 4, 128), ((17, 100), 4, 32), ((17, 100), 3, 7), ((33, 257), 4, 128),
                ((33, 257), 2, 64), ((5, 130), 5, 128), ((9, 96), 6, 48), ((3, 64), 7, 1),
                ((8, 200), 8, 128), ((7,), 4, 128), ((), 3, 4), ((2, 3, 40), 4, 16), ((4, 300), 4, 256),
                # byte-aligned rows, whole-tile groups: the packed kernel (4-bit g128, 2-bit)
                ((33, 130), 4, 128), ((3, 64), 4, 128), ((40, 256), 4, 128), ((17, 200), 2, 128),
                ((1000,), 4, 128), ((515,), 3, 64)]  # one long row: many column blocks


@pytest.mark.parametrize("shape,bits,g", DECODE_CASES, ids=str)
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_decode_matches_reference(device: torch.device, shape: tuple[int, ...], bits: int, g: int, wide: bool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    k = _kernels()
    if wide:  # the int64 offsets of payloads past 2**31 bits, on a small one
        monkeypatch.setattr(k, "_WIDE_AT", 0)
    enc, spec = _payload(shape, bits, g, hash((shape, bits, g)) % 2**31, device)
    ref = _reference(enc, spec, torch.float32)
    out = torch.full(spec.shape, float("nan"), dtype=torch.float32, device=device)
    got = k.decode(enc, spec, torch.float32, out=out)
    assert got is out and got.shape == ref.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-6, atol=1e-7)
    for dt in (torch.bfloat16, torch.float16):
        low = k.decode(enc, spec, dt)
        assert low.dtype == dt and torch.isfinite(low).all()
        # within one rounding of the float32 value (equal unless an FMA moved a tie)
        torch.testing.assert_close(low.cpu().float(), ref.to(dt).float(), rtol=2 ** -7, atol=0)


def test_decode_wired_into_codec(device: torch.device) -> None:
    enc, spec = _payload((6, 40), 4, 16, 3, device)
    got = Rtn.decode(enc, spec, {}, device, torch.bfloat16)  # kernel on CUDA, reference on the CPU
    ref = _reference(enc, spec, torch.float32).to(torch.bfloat16)
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=2 ** -7, atol=0)
    if device.type == "cpu":  # the CPU keeps its own path even under the interpreter: bit-exact
        assert torch.equal(got, ref)


def test_decode_empty_and_bad_out(device: torch.device) -> None:
    k = _kernels()
    enc, spec = _payload((0, 16), 4, 8, 1, device)
    assert k.decode(enc, spec, torch.float32).shape == (0, 16)
    enc, spec = _payload((2, 16), 4, 8, 1, device)
    with pytest.raises(Exception, match="out must be"):
        k.decode(enc, spec, torch.float32, out=torch.empty(2, 16, dtype=torch.float16, device=device))


MATMUL_CASES = [((16, 256), 4, 128), ((17, 100), 4, 32), ((33, 257), 4, 128), ((40, 64), 2, 64),
                ((24, 130), 3, 128), ((20, 96), 8, 32), ((9, 50), 4, 7), ((70, 512), 4, 128)]


@pytest.mark.parametrize("shape,bits,g", MATMUL_CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("tiles", ["split-k", "wide-rows"])
def test_matmul_matches_reference(device: torch.device, shape: tuple[int, int], bits: int, g: int,
                                  batch: int, tiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``split-k``: tiny shapes get 32-row blocks and split K (fp32 atomics); ``wide-rows``: the
    128/64-row blocks of large weights, one program per row block (no split), int64 code offsets."""
    k = _kernels()
    programs = None  # the modules' own targets
    if tiles == "wide-rows":
        programs = 1
        monkeypatch.setattr(k, "_WIDE_AT", 0)
    enc, spec = _payload(shape, bits, g, hash((shape, bits, g, batch)) % 2**31, device)
    w = k.prepare(enc, spec)
    groups = -(-shape[1] // g)
    assert w.bits_per_weight < bits + 32 * groups / shape[1] + 8 * bits / shape[1] + 0.01  # + row padding
    wref = _reference(enc, spec, torch.float32)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, shape[1], generator=gen)
    ref = x @ wref.T
    y = k.matmul(x.to(device), w, programs=programs)
    assert y.shape == (batch, shape[0]) and y.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    xb = x.to(device, torch.bfloat16)
    yb = k.matmul(xb, w, programs=programs)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    refb = xb.float().cpu() @ wref.to(torch.bfloat16).float().T
    torch.testing.assert_close(yb.cpu().float(), refb, rtol=2e-2, atol=2e-2)


def test_matmul_leading_dims_fp16_and_many_rows(device: torch.device) -> None:
    k = _kernels()
    enc, spec = _payload((24, 128), 4, 64, 5, device)
    w = k.prepare(enc, spec)
    wref = _reference(enc, spec, torch.float32)
    for lead in ((2, 3), (1, 1), (20,)):  # 20 rows: decode + F.linear
        x = torch.randn(*lead, 128)
        y = k.matmul(x.to(device, torch.float16), w)
        assert y.shape == (*lead, 24) and y.dtype == torch.float16
        ref = x.half().float() @ wref.half().float().T
        torch.testing.assert_close(y.cpu().float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture() -> None:
    """decode into a ring-buffer slice and matmul at batch 1 and 4 replay inside a CUDA graph."""
    k = _kernels()
    dev = torch.device("cuda")
    enc, spec = _payload((96, 384), 4, 128, 11, dev)
    w = k.prepare(enc, spec)
    ring = torch.full((2, 96, 384), float("nan"), dtype=torch.bfloat16, device=dev)
    x1 = torch.randn(1, 384, device=dev, dtype=torch.bfloat16)
    x4 = torch.randn(4, 384, device=dev, dtype=torch.bfloat16)
    k.decode(enc, spec, torch.bfloat16, out=ring[1]), k.matmul(x1, w), k.matmul(x4, w)  # compile first
    torch.cuda.synchronize()
    ring.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k.decode(enc, spec, torch.bfloat16, out=ring[1])
        y1, y4 = k.matmul(x1, w), k.matmul(x4, w)
    graph.replay()
    torch.cuda.synchronize()
    ref = _reference(enc, spec, torch.float32)
    assert torch.isnan(ring[0]).all() and torch.isfinite(ring[1]).all()
    torch.testing.assert_close(ring[1].cpu().float(), ref.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)
    for x, y in ((x1, y1), (x4, y4)):
        refy = x.float().cpu() @ ref.to(torch.bfloat16).float().T
        torch.testing.assert_close(y.cpu().float(), refy, rtol=2e-2, atol=2e-2)
