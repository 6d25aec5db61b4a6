"""GPU benchmark case for ``rtn`` (bits 4, group 128): a realistic payload for ``benchmarks/gpu_bench.py``.

The lead's bench imports ``NAME`` and ``payload`` and times ``thawed.codecs.kernels.rtn.decode`` and
``prepare``/``matmul`` against a device copy and bf16 ``F.linear``. Encoding runs on the CPU through
the codec's own ``encode`` (plain RTN, no HQQ): about 2 s for 4096x11008 on 2 cores.
"""

from __future__ import annotations

import torch

from thawed.codecs import EncodeContext, Encoded, SharedState, TensorSpec
from thawed.codecs.rtn import Rtn

NAME = "rtn"
BITS, GROUP_SIZE = 4, 128  # 4.25 bits/weight


def payload(shape: tuple[int, int], device: torch.device, seed: int = 0) -> tuple[Encoded, TensorSpec, SharedState]:
    """A 4-bit g128 rtn payload of N(0, 0.02) weights of ``shape`` (out x in), fields on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    spec = TensorSpec("bench.weight", tuple(shape), torch.bfloat16, "linear")
    enc = Rtn(bits=BITS, group_size=GROUP_SIZE).encode(w, spec, EncodeContext(spec.name, seed=seed))
    return enc.to(device), spec, {}
