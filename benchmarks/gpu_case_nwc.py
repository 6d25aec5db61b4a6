"""GPU benchmark case for ``nwc``: random normal weights through the shipped network at ~4.25
bits/weight (``lam`` = 160), decoded on the device (``thawed.codecs.kernels.nwc``: Triton rANS lanes,
then the decoder MLP as batched matmuls); read by ``benchmarks/gpu_bench.py``. Encoding runs the
encoder MLP and rANS on the host: seconds to a few tens of seconds for 4096x11008 on 16 cores."""

from __future__ import annotations

import torch

from thawed.codecs import EncodeContext, Encoded, SharedState, TensorSpec
from thawed.codecs.nwc import Nwc

NAME = "nwc"
LAM = 160.0  # ~4.25 bits/weight on N(0, s) weights (measured: 4.245-4.253 on 576x576, 1536x576, 576x1536)


def payload(shape: tuple[int, int], device: torch.device, seed: int = 0) -> tuple[Encoded, TensorSpec, SharedState]:
    """(payload on ``device``, spec, shared state on ``device``) of an N(0, 0.02) weight of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    spec = TensorSpec(f"bench.nwc.{shape[0]}x{shape[1]}", tuple(shape), torch.float32, "linear")
    codec = Nwc(lam=LAM)  # lam, not target_bpw: skips the rate search (20 trial encodes)
    with torch.inference_mode():
        enc = codec.encode(w, spec, EncodeContext(spec.name))
    shared = {k: v.to(device) for k, v in codec.shared_tensors().items()}
    return enc.to(device), spec, shared
