"""cvxq Triton kernels (``thawed.codecs.kernels.cvxq``) against the PyTorch reference decode.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so
shapes are tiny; the same tests run natively on CUDA when present.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thawed.codecs import CorruptPayloadError, EncodeContext, Encoded, TensorSpec
from thawed.codecs.cvxq import DEPTH_EXTRA, INPUT_MEAN_EXTRA, Cvxq, group_layout
from thawed.codecs.kernels import kernels_available

kc = pytest.importorskip("thawed.codecs.kernels.cvxq")

DEVICES = [torch.device("cpu"),
           pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
CASES = [((1, 7), 192), ((17, 100), 8), ((33, 257), 16), ((33, 257), 12), ((40, 70), 192), ((2, 3, 40), 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _need_kernels(device: torch.device) -> None:
    if not kernels_available(device):
        pytest.skip(f"Triton kernels unavailable on {device} (no Triton, or the interpreter is off)")


@pytest.fixture(params=DEVICES, ids=lambda d: d.type)
def device(request) -> torch.device:
    return request.param


def _payload(shape: tuple[int, ...], group_rows: int, seed: int, depths: str = "mixed",
             bias: bool = False) -> tuple[Encoded, TensorSpec]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05 + 0.01
    _, n, _, r = group_layout(shape, group_rows)
    if depths == "mixed":
        d = torch.randint(0, 9, (r, n), generator=gen)
    else:
        d = torch.full((r, n), int(depths))
    spec = TensorSpec("t.weight", tuple(shape), torch.float32, "linear")
    extras = {DEPTH_EXTRA: d}
    if bias:
        extras[INPUT_MEAN_EXTRA] = torch.randn(n, generator=gen)
    return Cvxq(group_rows=group_rows).encode(w, spec, EncodeContext("t.weight", extras=extras)), spec


def _reference(enc: Encoded, spec: TensorSpec) -> torch.Tensor:
    return Cvxq.decode(enc, spec, {}, torch.device("cpu"), torch.float32, fast=False)


def _check_decode(enc: Encoded, spec: TensorSpec, device: torch.device, dtype: torch.dtype) -> None:
    ref = _reference(enc, spec)
    out = torch.full(spec.shape, float("nan"), dtype=dtype, device=device)
    got = kc.decode(enc.to(device), spec, dtype, out=out)
    assert got is out
    got = got.cpu()
    assert torch.isfinite(got.float()).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    else:  # within one rounding of the reference's own cast
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("case,dtype", [(c, d) for c in CASES for d in DTYPES[:2]]
                         + [(c, torch.float16) for c in CASES[1:3]], ids=str)
def test_decode_matches_reference(device: torch.device, case, dtype: torch.dtype) -> None:
    shape, g = case
    enc, spec = _payload(shape, g, seed=hash((shape, g, str(dtype))) % 2**31)
    _check_decode(enc, spec, device, dtype)


@pytest.mark.parametrize("depths", ["0", "1", "3", "8"])
def test_decode_uniform_depths(device: torch.device, depths: str) -> None:
    enc, spec = _payload((19, 45), 8, seed=int(depths), depths=depths)
    _check_decode(enc, spec, device, torch.float32)


def test_decode_with_bias_field_and_into_a_ring_slice(device: torch.device) -> None:
    enc, spec = _payload((24, 40), 8, seed=5, bias=True)
    assert "bias" in enc.fields
    ring = torch.full((3 * 24 * 40,), float("nan"), dtype=torch.bfloat16, device=device)
    out = ring[24 * 40: 2 * 24 * 40].view(24, 40)
    got = kc.decode(enc.to(device), spec, torch.bfloat16, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.cpu().float(), _reference(enc, spec).bfloat16().float(), rtol=2 ** -7, atol=1e-6)
    assert ring[: 24 * 40].isnan().all() and ring[2 * 24 * 40:].isnan().all()  # nothing outside the slice


@pytest.mark.parametrize("rows,dtype", [(r, torch.bfloat16) for r in (1, 3, 16, 17)]
                         + [(r, d) for r in (1, 3) for d in (torch.float16, torch.float32)], ids=str)
def test_matmul_matches_linear(device: torch.device, rows: int, dtype: torch.dtype) -> None:
    shape, g = (40, 70), 16
    enc, spec = _payload(shape, g, seed=rows)
    w = kc.prepare(enc.to(device), spec)
    r, n = enc.fields["loc"].shape
    assert w.nbytes <= enc.nbytes + 4 * r * n + 240 * r  # + a 16-bit column per group, scales of depth-0 groups, class tables
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = kc.matmul(x.to(device), w, programs=6).cpu()  # two splits: fewer programs under the interpreter
    assert y.shape == (rows, shape[0]) and y.dtype == dtype and torch.isfinite(y.float()).all()
    wref = _reference(enc, spec).to(dtype).float()
    expect = x.float() @ wref.T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expect, rtol=tol, atol=tol)


def test_matmul_and_decode_with_groups_taller_than_a_tile(device: torch.device) -> None:
    enc, spec = _payload((520, 20), 300, seed=11)  # G = 300: two 256-row tiles per block, last block 220 rows
    _check_decode(enc, spec, device, torch.float32)
    w = kc.prepare(enc.to(device), spec)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(4)).bfloat16()
    ref = _reference(enc, spec).bfloat16().float()
    for rows in (1, 3):
        y = kc.matmul(x[:rows].to(device), w, programs=1).cpu()  # no split-K: fewer programs (interpreter)
        torch.testing.assert_close(y.float(), x[:rows].float() @ ref.T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("programs", [1, 528])
def test_matmul_mixed_depths_odd_shape(device: torch.device, programs: int) -> None:
    """programs 1: no split-K, the column loop runs 5 tiles."""
    enc, spec = _payload((33, 257), 12, seed=9)
    w = kc.prepare(enc.to(device), spec)
    x = torch.randn(5, 1, 257, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = kc.matmul(x.to(device), w, programs=programs).cpu()
    assert y.shape == (5, 1, 33)
    expect = F.linear(x.float(), _reference(enc, spec).bfloat16().float())
    torch.testing.assert_close(y.float(), expect, rtol=2e-2, atol=2e-2)


def test_prepare_refuses_depths_that_contradict_counts(device: torch.device) -> None:
    enc, spec = _payload((17, 20), 8, seed=2)
    depth = enc.fields["depth"].clone()
    depth[0] ^= 0x0F
    bad = Encoded({**enc.fields, "depth": depth}, enc.params)
    with pytest.raises(CorruptPayloadError, match="do not match"):
        kc.prepare(bad.to(device), spec)
    kc.decode(bad.to(device), spec, torch.float32)  # garbage, but no out-of-bounds access (masked loads)


def test_codec_decode_uses_the_kernel_on_cuda_only(device: torch.device, monkeypatch) -> None:
    enc, spec = _payload((17, 30), 8, seed=4)
    calls = []
    real = kc.decode
    monkeypatch.setattr(kc, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = Cvxq.decode(enc.to(device), spec, {}, device, torch.float32)
    assert bool(calls) == (device.type == "cuda")
    torch.testing.assert_close(got.cpu(), _reference(enc, spec), rtol=1e-6, atol=1e-7)


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from thawed.codecs.kernels import cvxq as kc

ptrs = {"out_ptr": "*bf16", "x_ptr": "*bf16", "part_ptr": "*fp32", "codes_ptr": "*u8", "depth_ptr": "*u8",
        "loc_ptr": "*fp16", "scale_ptr": "*fp16", "prefix_ptr": "*i32", "lv_ptr": "*fp32", "perm_ptr": "*i16",
        "cs_ptr": "*i32", "ts_ptr": "*i32", "cbase_ptr": "*i64", "p1_ptr": "*u8", "p2_ptr": "*i16", "p4_ptr": "*i32",
        "hist_ptr": "*i32"}
cases = [(kc._hist_kernel, {"HB": 32, "CH": kc.CHUNK}, 4),
         (kc._decode_kernel, {"BJ": 32, "BI": 64, "CH": kc.CHUNK}, 4),
         (kc._packed_decode_kernel, {"BJ": 32, "BI": 64}, 4),
         (kc._matmul_kernel, {"BM": 16, "BJ": 32, "BI": 64, "USE_DOT": False, "DOT_F32": False}, 4),
         (kc._matmul_kernel, {"BM": 16, "BJ": 32, "BI": 64, "USE_DOT": True, "DOT_F32": False}, 4)]
for fn, consts, warps in cases:
    names = fn.arg_names
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i64" if a == "nbytes" else "i32") for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a.endswith("_ptr") or a == "n"}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert "ld.global" in k.asm["ptx"], fn.__name__
print("compiled", len(cases))
"""


def test_kernels_compile_for_sm90(device: torch.device) -> None:
    """Compile every kernel for an H100/H200 (sm_90) without a GPU, in a process without the
    interpreter: catches what the interpreter accepts but the compiler does not (types, layouts,
    tl.dot shapes). Skips where this Triton lacks the ahead-of-time API or the CUDA backend."""
    import os
    import subprocess
    import sys

    if device.type != "cpu":
        pytest.skip("compiled natively on CUDA by the other tests")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode and ("ImportError" in res.stderr or "TypeError: ASTSource" in res.stderr
                           or "no backend" in res.stderr.lower()):
        pytest.skip(f"no ahead-of-time Triton compile here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled 5" in res.stdout


# ---- prepare's depth-uniform layout (columns sorted by depth per row block, codes in 4/2/1-bit planes)
@pytest.mark.parametrize("depths", ["0", "3", "8", "mixed"])
def test_matmul_depth_classes_partial_last_group(device: torch.device, depths: str) -> None:
    """G = 10 (not a multiple of 8: rows padded to 16 per group), last block 7 rows, odd n."""
    enc, spec = _payload((27, 37), 10, seed=20 + len(depths), depths=depths)
    w = kc.prepare(enc.to(device), spec)
    assert tuple(w.cs[:, -1].cpu().tolist()) == (37,) * 3 and (w.cs[:, 1:] >= w.cs[:, :-1]).all()
    wref = _reference(enc, spec)
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(7))
    y1 = kc.matmul(x[:1].to(device), w, programs=4).cpu()
    torch.testing.assert_close(y1, x[:1] @ wref.T, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    y3 = kc.matmul(xb.to(device), w, programs=4).cpu()
    torch.testing.assert_close(y3.float(), xb.float() @ wref.bfloat16().float().T, rtol=2e-2, atol=2e-2)


def test_prepared_decode_for_many_rows_every_depth(device: torch.device) -> None:
    """The >16-row path decodes the prepared layout exactly (every depth 0..8 present, odd shape)."""
    enc, spec = _payload((33, 61), 12, seed=31)
    w = kc.prepare(enc.to(device), spec)
    d = (enc.fields["depth"].long() & 15).tolist() + (enc.fields["depth"].long() >> 4).tolist()
    assert set(range(9)) <= set(d)
    out = kc._decode_packed(w, torch.float32).cpu()
    torch.testing.assert_close(out, _reference(enc, spec), rtol=1e-6, atol=1e-7)


def test_prepared_bits_per_weight_near_payload(device: torch.device) -> None:
    enc, spec = _payload((384, 256), 192, seed=3, depths="4")
    w = kc.prepare(enc.to(device), spec)
    payload_bpw = 8 * enc.nbytes / (384 * 256)
    assert w.bits_per_weight <= payload_bpw + 0.15, (w.bits_per_weight, payload_bpw)  # 4.29 vs 4.19
