"""Direct mode (runtime/direct.py): a linear that runs from its packed rtn codes equals
dequantise-then-matmul within bf16 rounding, on odd shapes; fused layers equal separate ones;
rtn decode_rows equals rows of the full decode; modes and budget accounting in a LazyModel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.codecs.base import TensorSpec
from thawed.codecs.rtn import Rtn
from thawed.runtime.direct import DirectLinear, direct_unsupported_reason, fuse_direct, kernel_group_size

CPU = torch.device("cpu")


def _rtn_linear(m: int, n: int, bits: int, g: int, seed: int = 0, bias: bool = False):
    torch.manual_seed(seed)
    w = torch.randn(m, n) * 0.05
    spec = TensorSpec("w", (m, n), torch.float32, "linear")
    enc = Rtn(bits=bits, group_size=g).encode(w, spec, None)
    decoded = Rtn.decode(enc, spec, {}, CPU, torch.float32)
    b = torch.randn(m) * 0.1 if bias else None
    lin = DirectLinear.from_rtn(enc.fields["codes"], enc.fields["scale"], enc.fields["offset"], enc.params,
                                (m, n), b, CPU)
    return lin, decoded, b


def _close_to_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> None:
    # Reference: the decoded weight, the same bf16-rounded input, an fp32 matmul. What remains is
    # bf16 rounding of the kernel's scales, zero points and output (relative ~2^-8 of the sum).
    ref = F.linear(x.to(torch.bfloat16).float(), w, b)
    assert torch.isfinite(y).all()
    scale = (x.to(torch.bfloat16).float().abs() @ w.abs().t()).clamp_min(1e-3)
    err = ((y.float() - ref).abs() / scale).max()
    assert err < 2e-2, f"relative error {err:.3g}"


@pytest.mark.parametrize("m,n,bits,g", [(16, 32, 4, 32), (48, 576, 4, 128), (64, 96, 3, 32), (32, 192, 2, 64),
                                        (80, 160, 4, 32), (1536, 576, 4, 128)])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_direct_equals_dequantise_then_matmul(m, n, bits, g, rows):
    lin, w, _ = _rtn_linear(m, n, bits, g, seed=m + n + rows)
    x = torch.randn(rows, n)
    _close_to_reference(lin(x), x, w, None)
    x3 = torch.randn(2, rows, n)  # leading dimensions are kept
    assert lin(x3).shape == (2, rows, m)


def test_direct_with_bias_and_bf16_input():
    lin, w, b = _rtn_linear(32, 64, 4, 32, bias=True)
    x = torch.randn(5, 64)
    _close_to_reference(lin(x), x, w, b)
    assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_fused_layers_equal_separate_ones():
    parts = [_rtn_linear(m, 576, 4, 128, seed=i)[0] for i, m in enumerate((576, 192, 96))]
    x = torch.randn(3, 576)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_direct(parts)
    assert fused is not None and fused.out_features == 576 + 192 + 96
    assert torch.equal(fused(x), separate)
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), separate), "separate layers still work"
    assert all(p.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr() for p in parts)
    # a 96-row block in the middle would break the 64-row packing: not fused
    assert fuse_direct([parts[2], parts[0]]) is None


def test_unsupported_shapes_and_codecs_say_why():
    assert kernel_group_size(576, 128) == 64 and kernel_group_size(1536, 128) == 128
    assert kernel_group_size(100, 128) is None
    assert "codec" in direct_unsupported_reason("cvxq", {}, (64, 64), CPU)
    assert "bits" in direct_unsupported_reason("rtn", {"bits": 6, "group_size": 64}, (64, 64), CPU)
    assert "16" in direct_unsupported_reason("rtn", {"bits": 4, "group_size": 32}, (40, 64), CPU)
    assert direct_unsupported_reason("rtn", {"bits": 4, "group_size": 32}, (48, 64), CPU) is None


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("m,n,g", [(7, 13, 4), (33, 576, 128), (5, 17, 32)])
def test_rtn_decode_rows_equals_rows_of_decode(bits, m, n, g):
    torch.manual_seed(bits * 100 + n)
    spec = TensorSpec("emb", (m, n), torch.float32, "embedding")
    enc = Rtn(bits=bits, group_size=g).encode(torch.randn(m, n), spec, None)
    full = Rtn.decode(enc, spec, {}, CPU, torch.float32)
    ids = torch.tensor([[0, m - 1, 2 % m], [1, 1, 3 % m]])
    assert torch.equal(Rtn.decode_rows(enc, spec, {}, ids, CPU, torch.float32), full[ids])
    with pytest.raises(Exception, match="row ids"):
        Rtn.decode_rows(enc, spec, {}, torch.tensor([m]), CPU, torch.float32)
