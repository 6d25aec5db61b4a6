"""GPU benchmark case for ``lossless``: a bf16 tensor of random normal values (~10.7 bits/weight),
decoded by the one-pass Triton kernel (``thawed.codecs.kernels.lossless``); read by
``benchmarks/gpu_bench.py``. Encoding runs on the host (rANS encode: a few seconds for 4096x11008)."""

from __future__ import annotations

import torch

from thawed.codecs import EncodeContext, Encoded, SharedState, TensorSpec
from thawed.codecs.lossless import Lossless

NAME = "lossless"


def payload(shape: tuple[int, int], device: torch.device, seed: int = 0) -> tuple[Encoded, TensorSpec, SharedState]:
    """(payload on ``device``, spec, shared state) of a bf16 N(0, 0.02) weight of ``shape`` (out x in)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    spec = TensorSpec(f"bench.lossless.{shape[0]}x{shape[1]}", tuple(shape), torch.bfloat16, "linear")
    enc = Lossless().encode(w, spec, EncodeContext(spec.name))
    return enc.to(device), spec, {}
