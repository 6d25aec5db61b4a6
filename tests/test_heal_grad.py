"""Healing's differentiable view of each payload (issue 17, item 1): every codec's ``decode_train``
equals its ``decode`` at the stored values, and is differentiable in exactly the fields it declares
(``torch.autograd.gradcheck`` in float64 on tiny shapes; every declared field gets a gradient)."""

from __future__ import annotations

import pytest
import torch

from thawed.codecs import EncodeContext, TensorSpec, get_codec

CPU = torch.device("cpu")


def _cases() -> list[tuple[str, str, dict, tuple[int, ...], str]]:
    """(id, codec, options, shape, role): odd shapes, partial groups, every mode of every codec."""
    return [
        ("rtn-b3-g8", "rtn", dict(bits=3, group_size=8), (6, 13), "linear"),
        ("rtn-b2-g4-hqq", "rtn", dict(bits=2, group_size=4, hqq=True), (5, 9), "linear"),
        ("cvxq-b3", "cvxq", dict(group_rows=4, bits=3, bias=False), (10, 7), "linear"),
        ("cvxq-b1", "cvxq", dict(group_rows=3, bits=1, bias=False), (7, 5), "linear"),
        ("hyperc-d2", "hyperc", dict(dim=2, index_bits=6, group_size=6), (5, 11), "linear"),
        ("hyperc-d1", "hyperc", dict(dim=1, index_bits=3, group_size=4), (4, 10), "linear"),
        ("see-rows-f16", "see", dict(rank=2, units=3, core_bits=4, residual_bits=0), (24, 10), "embedding"),
        ("see-rows-f8-res", "see", dict(rank=2, units=3, core_bits=3, factor_bits=8, residual_bits=2,
                                        residual_group=4), (20, 9), "embedding"),
        ("see-matrix-res", "see", dict(mode="matrix", rank=2, residual_bits=3, residual_group=4), (6, 8), "linear"),
        ("nwc", "nwc", dict(lam=256.0), (17, 5), "linear"),
        ("raw-norm", "raw", {}, (7,), "other"),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_decode_train_matches_decode_and_is_differentiable_in_declared_fields(case):
    _, name, opts, shape, role = case
    cls = get_codec(name)
    g = torch.Generator().manual_seed(len(shape) * 31 + shape[0])
    w = torch.randn(shape, generator=g)
    spec = TensorSpec("t.weight", shape, torch.float32, role)
    extras = {"token_freq": torch.rand(shape[0], generator=g)} if role == "embedding" else {}
    codec = cls(**opts)
    enc = codec.encode(w, spec, EncodeContext("t.weight", role, extras=extras))
    shared = codec.shared_tensors()
    names = cls.trainable_fields(spec, enc.params)
    assert names, f"{name} declares no trainable field"
    assert set(names) <= set(enc.fields)
    for k, t in enc.fields.items():  # every continuous field is declared; codes/indices are integers
        if k not in names and t.is_floating_point():
            assert name == "cvxq" and k == "bias", f"{name}: float field {k!r} is neither trainable nor a code"

    ref = cls.decode(enc, spec, shared, CPU, torch.float32)
    fields = {k: (v.to(torch.float32) if k in names else v) for k, v in enc.fields.items()}
    got = cls.decode_train(fields, spec, enc.params, shared, {})
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    memo: dict = {}
    leaves = {k: enc.fields[k].to(torch.float64).requires_grad_(True) for k in names}

    def fn(*vals: torch.Tensor) -> torch.Tensor:
        f = dict(enc.fields) | dict(zip(names, vals))
        return cls.decode_train(f, spec, enc.params, shared, memo)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-6, rtol=1e-4)
    out = fn(*leaves.values())
    assert out.dtype == torch.float64 and out.shape == spec.shape
    out.square().sum().backward()
    for k, t in leaves.items():
        assert t.grad is not None and float(t.grad.abs().sum()) > 0, f"{name}: field {k!r} gets no gradient"


def test_frozen_codecs_declare_nothing_and_decode_constants():
    """lossless is bit-exact by design; a raw weight matrix is not trained (that is fine-tuning)."""
    w = torch.randn(6, 10)
    for name, role in (("lossless", "linear"), ("raw", "linear")):
        cls = get_codec(name)
        spec = TensorSpec("t.weight", (6, 10), torch.float32, role)
        enc = cls().encode(w, spec, EncodeContext("t.weight", role))
        assert cls.trainable_fields(spec, enc.params) == ()
        out = cls.decode_train(dict(enc.fields), spec, enc.params, {}, {})
        assert torch.equal(out, w) and not out.requires_grad


def test_decode_train_refuses_stored_dtype_fields():
    from thawed.codecs import CodecError

    cls = get_codec("rtn")
    spec = TensorSpec("t.weight", (4, 8), torch.float32, "linear")
    enc = cls(bits=3, group_size=4).encode(torch.randn(4, 8), spec, EncodeContext("t.weight"))
    with pytest.raises(CodecError, match="float32 or float64"):
        cls.decode_train(dict(enc.fields), spec, enc.params, {}, {})  # scale/offset still f16


def test_see_core_codes_train_straight_through_and_pack_back():
    """SEE's per-token core codes: as float code values decode_train rounds them (equal to decode at the
    stored codes), passes the gradient through, and ste_pack stores them back bit for bit."""
    cls = get_codec("see")
    spec = TensorSpec("e.weight", (30, 11), torch.float32, "embedding")
    w = torch.randn(30, 11, generator=torch.Generator().manual_seed(5))
    enc = cls(rank=2, units=3, core_bits=4, residual_bits=0).encode(w, spec, EncodeContext("e.weight", "embedding"))
    assert cls.ste_fields(spec, enc.params) == ("core",)
    names = cls.trainable_fields(spec, enc.params)
    codes = cls.ste_values("core", enc.fields, spec, enc.params)
    assert torch.equal(cls.ste_pack("core", codes + 0.3, spec, enc.params), enc.fields["core"])  # rounds back
    c = codes.clone().requires_grad_(True)
    fields = {k: (v.float() if k in names else v) for k, v in enc.fields.items()} | {"core": c}
    out = cls.decode_train(fields, spec, enc.params, {}, {})
    torch.testing.assert_close(out, cls.decode(enc, spec, {}, CPU, torch.float32), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert c.grad is not None and float(c.grad.abs().sum()) > 0
    big = torch.full_like(codes, 100.0)  # clamped to the code range on packing
    assert int(cls.ste_values("core", {"core": cls.ste_pack("core", big, spec, enc.params)}, spec, enc.params).max()) == 7


@pytest.mark.parametrize("bits,group,shape", [(3, 8, (6, 13)), (2, 4, (5, 9)), (4, 128, (3, 200))])
def test_rtn_codes_train_straight_through_and_pack_back(bits, group, shape):
    """rtn's codes (``--ste``): as float code values decode_train equals decode at the stored codes,
    rounds and clamps them forward, passes the gradient through, and ste_pack stores them back bit for
    bit; hyperc (same scale/offset healing) declares no straight-through field."""
    cls = get_codec("rtn")
    spec = TensorSpec("t.weight", shape, torch.float32, "linear")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    enc = cls(bits=bits, group_size=group).encode(w, spec, EncodeContext("t.weight"))
    assert cls.ste_fields(spec, enc.params) == ("codes",)
    assert get_codec("hyperc").ste_fields(spec, {}) == ()
    codes = cls.ste_values("codes", enc.fields, spec, enc.params)
    assert codes.shape == shape and float(codes.max()) <= (1 << bits) - 1
    assert torch.equal(cls.ste_pack("codes", codes - 0.4, spec, enc.params), enc.fields["codes"])  # rounds back
    c = (codes + 0.3).requires_grad_(True)  # rounds to the stored codes
    fields = {"scale": enc.fields["scale"].float(), "offset": enc.fields["offset"].float(), "codes": c}
    out = cls.decode_train(fields, spec, enc.params, {}, {})
    torch.testing.assert_close(out, cls.decode(enc, spec, {}, CPU, torch.float32), rtol=0, atol=1e-6)
    out.sum().backward()
    # straight through: d out / d code = the group's scale, exactly
    expect = fields["scale"].repeat_interleave(group, dim=1)[:, : shape[1]]
    torch.testing.assert_close(c.grad, expect)
    over = cls.ste_pack("codes", torch.full(shape, 99.0), spec, enc.params)  # clamped on packing
    assert int(cls.ste_values("codes", {"codes": over}, spec, enc.params).max()) == (1 << bits) - 1
    far = cls.decode_train(fields | {"codes": torch.full(shape, -5.0)}, spec, enc.params, {}, {})
    torch.testing.assert_close(far, fields["offset"].repeat_interleave(group, dim=1)[:, : shape[1]])  # clamped at 0


def test_rtn_straight_through_start_rounds_to_the_stored_codes_and_carries_the_remainder():
    cls = get_codec("rtn")
    spec = TensorSpec("t.weight", (6, 20), torch.float32, "linear")
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(9))
    enc = cls(bits=3, group_size=8).encode(w, spec, EncodeContext("t.weight"))
    start = cls.ste_start("codes", enc.fields, spec, enc.params, w)
    assert torch.equal(cls.ste_pack("codes", start, spec, enc.params), enc.fields["codes"])  # same codes
    stored = cls.ste_values("codes", enc.fields, spec, enc.params)
    assert float((start - stored).abs().max()) <= 0.4901 and float((start - stored).abs().mean()) > 0.1
    assert torch.equal(cls.ste_start("codes", enc.fields, spec, enc.params, None), stored)
    # a code moved off the dense weight's rounding (GPTQ's error feedback) starts mid-step, where a small
    # gradient does not flip it at once
    moved = stored.clone()
    moved[0, :4] = (moved[0, :4] + torch.where(moved[0, :4] < 7, 1.0, -1.0))
    fields = dict(enc.fields, codes=cls.ste_pack("codes", moved, spec, enc.params))
    start = cls.ste_start("codes", fields, spec, enc.params, w)
    assert torch.equal(start[0, :4], moved[0, :4])
    assert torch.equal(start[1:], cls.ste_start("codes", enc.fields, spec, enc.params, w)[1:])
