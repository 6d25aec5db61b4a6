"""Triton rANS lane decoder (``codecs/kernels/rans.py``) and its users ``lossless`` and ``nwc`` against
the references, on odd lane counts and partial last steps; under the interpreter on the CPU (tiny
shapes), natively on CUDA when present."""

from __future__ import annotations

import functools

import pytest
import torch

from thawed.codecs import CorruptPayloadError, EncodeContext, Encoded, TensorSpec, rans
from thawed.codecs.kernels import kernels_available
from thawed.codecs.lossless import Lossless
from thawed.codecs.nwc import WEIGHTS_DIR, Nwc

pytestmark = pytest.mark.skipif(not kernels_available("cpu") and not torch.cuda.is_available(),
                                reason="needs Triton (interpreter on the CPU) or CUDA")

DEVICES = [pytest.param("cpu", id="cpu-interp"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _dev(name: str) -> torch.device:
    if name == "cpu" and not kernels_available("cpu"):
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET=1)")
    return torch.device(name)


def _stream(n: int, a: int, k: int, seed: int, lanes: int | None, n_tables: int = 1):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (n_tables, a), generator=g) ** 2  # skewed, some zero
    counts[:, 0] += 1
    tables = torch.stack([rans.quantize_frequencies(c, k) for c in counts]).to(torch.int32)
    table_of = torch.randint(0, n_tables, (n,), generator=g) if n_tables > 1 else None
    probs = tables.float()[table_of if table_of is not None else torch.zeros(n, dtype=torch.long)]
    sym = torch.multinomial(probs, 1, generator=g).view(-1).to(torch.uint8)
    s = rans.encode(sym, tables if n_tables > 1 else tables[0], k, table_of=table_of, lanes=lanes)
    return sym, tables, table_of, s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,a,k,lanes,n_tables", [
    (1, 1, 8, 1, 1), (7, 5, 12, 3, 1), (100, 17, 12, 33, 1), (257, 256, 15, 37, 1),
    (300, 32, 10, 70, 3), (129, 7, 14, 64, 5)], ids=str)
def test_lane_decoder_equals_reference(device: str, n: int, a: int, k: int, lanes: int, n_tables: int) -> None:
    from thawed.codecs.kernels import rans as krans

    dev = _dev(device)
    sym, tables, table_of, s = _stream(n, a, k, n * a + k, lanes, n_tables)
    ref = rans.decode_reference(s.states, s.words, s.lane_words, tables, k, n, table_of=table_of)
    assert torch.equal(ref, sym)
    out = torch.full((n,), 0xAB, dtype=torch.uint8, device=dev)
    got = krans.decode_symbols(s.states.to(dev), s.words.to(dev), s.lane_words.to(dev), tables.to(dev), k, n,
                               table_of=None if table_of is None else table_of.to(dev), out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.cpu(), sym)
    if n_tables == 1 and n < 1000:  # check=False: same symbols, no sync
        again = krans.decode_symbols(s.states.to(dev), s.words.to(dev), s.lane_words.to(dev), tables[0].to(dev),
                                     k, n, check=False)
        assert torch.equal(again.cpu(), sym)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("u,a,k", [(1, 1, 8), (1, 256, 9), (3, 5, 8), (2, 33, 10)], ids=str)
def test_slot_table_kernel_equals_reference(device: str, u: int, a: int, k: int) -> None:
    from thawed.codecs.kernels import rans as krans

    dev = _dev(device)
    g = torch.Generator().manual_seed(u * a + k)
    counts = torch.randint(0, 9, (u, a), generator=g) ** 3
    counts[:, -1] += 1
    rows = torch.stack([rans.quantize_frequencies(c, k) for c in counts]).to(torch.int32).to(dev)
    assert torch.equal(krans.slot_table(rows, k, use_kernel=True).cpu(), krans.slot_table_reference(rows, k).cpu())
    bad = rows.clone()
    bad[0, 0] += 3  # a damaged row: both stay in bounds and agree
    assert torch.equal(krans.slot_table(bad, k, use_kernel=True).cpu(), krans.slot_table_reference(bad, k).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_big_lane_blocks(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 64-lane, 2-warp configuration that big tensors get (forced here on a small stream)."""
    from thawed.codecs.kernels import rans as krans

    dev = _dev(device)
    monkeypatch.setattr(krans, "launch_config", lambda lanes: (64, 2))
    sym, tables, _, s = _stream(1000, 9, 11, 5, 150)
    got = krans.decode_symbols(s.states.to(dev), s.words.to(dev), s.lane_words.to(dev), tables[0].to(dev), 11, 1000)
    assert torch.equal(got.cpu(), sym)


@pytest.mark.parametrize("device", DEVICES)
def test_column_table_mode_equals_table_of(device: str) -> None:
    """nwc's per-column level map (table = level * 16 + i % 16) gives the same symbols."""
    from thawed.codecs.kernels import rans as krans

    dev = _dev(device)
    cols, p, n_levels, k = 5, 32, 2, 12
    g = torch.Generator().manual_seed(3)
    col_level = torch.randint(0, n_levels, (cols,), generator=g)
    table_of = (col_level[:, None, None] * 16 + torch.arange(16)).expand(cols, p // 16, 16).reshape(-1)
    counts = torch.randint(1, 30, (n_levels * 16, 40), generator=g)
    tables = torch.stack([rans.quantize_frequencies(c, k) for c in counts]).to(torch.int32)
    sym = torch.multinomial(tables.float()[table_of], 1, generator=g).view(-1).to(torch.uint8)
    s = rans.encode(sym, tables, k, table_of=table_of, lanes=7)
    got = krans.decode_symbols(s.states.to(dev), s.words.to(dev), s.lane_words.to(dev), tables.to(dev), k,
                               cols * p, column_table=col_level.to(dev, torch.int32), period=p)
    assert torch.equal(got.cpu(), sym)


@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_stream_detected(device: str) -> None:
    from thawed.codecs.kernels import rans as krans

    dev = _dev(device)
    sym, tables, _, s = _stream(200, 20, 12, 9, 13)
    words = s.words.clone()
    words[len(words) // 2] ^= 0x5A5A
    with pytest.raises(CorruptPayloadError, match="bad-stream"):
        krans.decode_symbols(s.states.to(dev), words.to(dev), s.lane_words.to(dev), tables[0].to(dev), 12, 200,
                             what="bad-stream")
    lw = s.lane_words.clone()
    lw[0] += 1
    lw[1] -= 1  # same total, wrong split: lanes read the wrong words
    with pytest.raises(CorruptPayloadError, match="lanes"):
        krans.decode_symbols(s.states.to(dev), s.words.to(dev), lw.to(dev), tables[0].to(dev), 12, 200)
    bad_tab = tables[0].clone()
    bad_tab[0] += 1
    with pytest.raises(CorruptPayloadError, match="sum"):
        krans.decode_symbols(s.states.to(dev), s.words.to(dev), s.lane_words.to(dev), bad_tab.to(dev), 12, 200)
    # check=False never raises (sync-free), whatever the stream holds
    krans.decode_symbols(s.states.to(dev), words.to(dev), s.lane_words.to(dev), tables[0].to(dev), 12, 200,
                         check=False)


def _lossless(dtype: torch.dtype, shape: tuple[int, ...], seed: int, lanes_steps: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    flat = w.view(-1)
    if flat.numel() >= 4:
        flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40 if dtype == torch.float32 else 1e-7])
    spec = TensorSpec("m.w", tuple(shape), dtype, "linear")
    orig = rans.encode
    rans.encode = functools.partial(orig, steps=lanes_steps)  # many lanes, a partial last step, in a tiny tensor
    try:
        enc = Lossless().encode(w, spec, EncodeContext("m.w"))
    finally:
        rans.encode = orig
    return w, spec, enc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (17, 10), (3, 37)], ids=str)
def test_lossless_kernel_equals_reference(device: str, src: torch.dtype, shape: tuple[int, int]) -> None:
    from thawed.codecs.kernels import lossless as kl

    dev = _dev(device)
    w, spec, enc = _lossless(src, shape, sum(shape))
    ref = Lossless.decode(enc, spec, {}, torch.device("cpu"), src, fast=False)
    assert torch.equal(ref.view(torch.int16 if src != torch.float32 else torch.int32),
                       w.view(torch.int16 if src != torch.float32 else torch.int32))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
        if dtype == src:
            out.view(torch.int16 if src != torch.float32 else torch.int32).fill_(0x5A5A)  # poison the bits
        got = kl.decode(enc.to(dev), spec, dtype, out=out)
        assert got.data_ptr() == out.data_ptr() and got.shape == w.shape
        want = w.to(dtype)
        if dtype == src:  # bit for bit, NaN payloads included
            iv = torch.int16 if dtype != torch.float32 else torch.int32
            assert torch.equal(got.cpu().view(iv), want.view(iv))
        else:
            g32, w32 = got.cpu().float(), want.float()
            assert torch.equal(torch.isnan(g32), torch.isnan(w32))
            fin = torch.isfinite(w32)
            assert torch.isfinite(g32[fin]).all()
            torch.testing.assert_close(g32[~torch.isnan(w32)], w32[~torch.isnan(w32)], rtol=0, atol=0)
        nocheck = kl.decode(enc.to(dev), spec, dtype, check=False)
        assert torch.equal(nocheck.cpu().float().nan_to_num(7.0), got.cpu().float().nan_to_num(7.0))


@pytest.mark.parametrize("device", DEVICES)
def test_lossless_kernel_corrupt_names_tensor(device: str) -> None:
    from thawed.codecs.kernels import lossless as kl

    dev = _dev(device)
    w, spec, enc = _lossless(torch.bfloat16, (9, 11), 1)
    words = enc.fields["exp_words"].clone()
    words[0] ^= 0x7777
    bad = Encoded(enc.fields | {"exp_words": words}, enc.params)
    with pytest.raises(CorruptPayloadError, match="'m.w' exponents"):
        kl.decode(bad.to(dev), spec, torch.bfloat16)
    for missing in ("rest", "exp_states"):
        part = Encoded({k: v for k, v in enc.fields.items() if k != missing}, enc.params)
        with pytest.raises(CorruptPayloadError, match=f"no field '{missing}'"):
            kl.decode(part.to(dev), spec, torch.bfloat16)


@pytest.mark.skipif(not (WEIGHTS_DIR / "default.safetensors").is_file(), reason="needs the shipped nwc network")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(17, 5), (33, 3)], ids=str)
def test_nwc_kernel_equals_reference(device: str, shape: tuple[int, int]) -> None:
    from thawed.codecs.kernels import nwc as kn

    dev = _dev(device)
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.02
    spec = TensorSpec("t.weight", shape, torch.float32, "linear")
    imp = torch.rand(shape[1], generator=g)
    codec = Nwc(lam=256.0, steps=3)
    enc = codec.encode(w, spec, EncodeContext("t.weight", importance=imp))
    shared = codec.shared_tensors()
    ref = Nwc.decode(enc, spec, shared, torch.device("cpu"), torch.float32, fast=False)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
        got = kn.decode(enc.to(dev), spec, dtype, out=out, shared={k: v.to(dev) for k, v in shared.items()})
        assert got.data_ptr() == out.data_ptr() and torch.isfinite(got.float()).all()
        torch.testing.assert_close(got.cpu().float(), ref.to(dtype).float(),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_codecs_use_kernels_on_cuda() -> None:
    """The classmethod decoders take the kernel path on CUDA by default, with the reference's values."""
    w, spec, enc = _lossless(torch.bfloat16, (64, 33), 4, lanes_steps=512)
    dev = torch.device("cuda")
    got = Lossless.decode(enc.to(dev), spec, {}, dev, torch.bfloat16)
    assert torch.equal(got.cpu().view(torch.int16), w.view(torch.int16))
    if (WEIGHTS_DIR / "default.safetensors").is_file():
        w = torch.randn(40, 24, generator=torch.Generator().manual_seed(5)) * 0.02
        spec = TensorSpec("t.weight", (40, 24), torch.float32, "linear")
        codec = Nwc(lam=256.0, steps=64)
        enc = codec.encode(w, spec, EncodeContext("t.weight"))
        shared = codec.shared_tensors()
        ref = Nwc.decode(enc, spec, shared, torch.device("cpu"), torch.float32)
        got = Nwc.decode(enc.to(dev), spec, {k: v.to(dev) for k, v in shared.items()}, dev, torch.float32)
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)
