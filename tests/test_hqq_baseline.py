"""benchmarks/hqq_baseline.py, the benchmarks' one HQQ harness: the package's own parameters (round_zero
at 4 bits, which split the two former harnesses), the package's HQQLinear to within F16 scale/zero,
every linear and embedding weight replaced once, and an SQNR floor. Needs the bench extra (``hqq``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("hqq", reason="the HQQ baseline needs the bench extra: pip install -e '.[bench]'")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from hqq_baseline import hqq_bpw, hqq_dequantize, hqq_model, quant_params  # noqa: E402


def test_round_zero_is_the_package_default_at_4_bits_only():
    assert quant_params(4, 128)["round_zero"] is True
    assert quant_params(3, 128)["round_zero"] is False
    assert quant_params(4, 64)["axis"] == 1 and quant_params(4, 64)["optimize"] is True
    assert hqq_bpw(4, 128) == 4.25


@pytest.mark.parametrize("bits,shape,group", [(4, (24, 160), 32), (3, (17, 128), 64), (4, (8, 192), 64)])
def test_matches_the_package_hqqlinear(bits, shape, group):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    w = torch.randn(shape)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data = w.clone()
    ref = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=torch.float32,
                    device="cpu").dequantize().float().view(shape)
    out = hqq_dequantize(w, bits, group)
    assert out.shape == w.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    step = float(w.abs().max()) / (1 << bits)
    torch.testing.assert_close(out, ref, rtol=0, atol=step * 0.02)  # F16 scale/zero vs float32
    for grp in out.reshape(-1, group):
        assert grp.unique().numel() <= 1 << bits


def test_sqnr_floor_4_bit_g64():
    torch.manual_seed(1)
    w = torch.randn(256, 512) * 0.02
    out = hqq_dequantize(w, 4, 64)
    sqnr = 10 * math.log10(float(w.square().sum()) / float((w - out).square().sum()))
    assert sqnr > 18.0, sqnr


def test_replaces_every_linear_and_the_tied_embedding_once(tmp_path):
    from models_fixtures import make_tiny_llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_llama(tmp_path / "m")), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                   and m is not model.lm_head) + model.model.embed_tokens.weight.numel()
    assert hqq_model(model, 4, 32) == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, quantised once
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (p.dim() == 2), name  # norms untouched
        if p.dim() == 2:
            torch.testing.assert_close(p, hqq_dequantize(before[name], 4, 32))
