"""The *direct* execution mode on CUDA: a linear layer whose weight stays compressed in GPU memory
and runs through its codec's fused decode-matmul Triton kernel (``thawed.codecs.kernels``).

rtn, cvxq and hyperc each have ``prepare(enc, spec) -> weight`` (a one-time repack at load into
the kernel's layout, about the compressed size) and ``matmul(x, weight)``: each tile of codes is
decoded in registers right before its product, so nothing is materialised per token. The kernels
are tuned for the decode batch (at most 16 rows); a larger batch (prefill) decodes the weight into
a temporary and calls ``F.linear`` (inside the kernel module). The reference for every kernel is
its codec's PyTorch ``decode`` (tests/test_kernels_*.py).

The CPU's direct mode is ``runtime/direct.py`` (torch's int4 kernel); the switch is the same
(``RuntimeConfig.direct``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from thawed.codecs import Encoded, TensorSpec
from thawed.codecs.kernels import kernels_available, triton_missing_reason

__all__ = ["KernelLinear", "KERNEL_CODECS", "kernel_decoder", "kernel_unsupported_reason"]

KERNEL_CODECS = ("rtn", "cvxq", "hyperc")


def kernel_unsupported_reason(codec: str, shape: tuple[int, ...], device: torch.device) -> str | None:
    """None when a weight can run through a fused Triton kernel on ``device``, else why not."""
    if device.type != "cuda":
        return "the Triton kernels run on CUDA"
    if codec not in KERNEL_CODECS:
        return f"codec {codec!r} has no fused decode-matmul kernel (these have: {', '.join(KERNEL_CODECS)})"
    if len(shape) != 2:
        return "not a matrix"
    if not kernels_available(device):
        return triton_missing_reason() or "the Triton kernels are unavailable"
    return None


def kernel_decoder(codec: str, device: torch.device):
    """``fn(enc, spec, shared, dtype, out)`` decoding into ``out`` with the codec's Triton kernel,
    without host syncs (capturable in a CUDA graph; the payload was validated by a checked decode
    before), or None when the codec has no decode kernel or kernels cannot run on ``device``."""
    if device.type != "cuda" or not kernels_available(device):
        return None
    try:
        mod = _module(codec)
    except ImportError:
        return None
    fn = getattr(mod, "decode", None)
    if fn is None:
        return None
    import inspect

    unchecked = "check" in inspect.signature(fn).parameters  # lossless: skip the lanes' end-state check

    def decode(enc, spec, shared, dtype, out):
        if unchecked:
            return fn(enc, spec, dtype, out=out, shared=shared, check=False)
        return fn(enc, spec, dtype, out=out, shared=shared)

    return decode


def _module(codec: str):
    return importlib.import_module(f"thawed.codecs.kernels.{codec}")


class KernelLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` kept compressed and decoded inside a Triton matmul kernel."""

    def __init__(self, codec: str, weight: Any, in_features: int, out_features: int,
                 bias: Tensor | None) -> None:
        super().__init__()
        self.codec, self.weight_packed = codec, weight
        self.in_features, self.out_features = in_features, out_features
        self._matmul = _module(codec).matmul
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_payload(cls, codec: str, enc: Encoded, spec: TensorSpec, bias: Tensor | None) -> "KernelLinear":
        """Repack ``enc`` (already on the GPU) once for the codec's kernel."""
        m, n = spec.shape
        return cls(codec, _module(codec).prepare(enc, spec), n, m, bias)

    @property
    def nbytes(self) -> int:
        return int(self.weight_packed.nbytes)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features), self.weight_packed)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, codec={self.codec}, "
                f"bias={self.bias is not None}, mode=direct (Triton)")
