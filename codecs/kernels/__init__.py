"""GPU fast paths: one Triton kernel per codec decode, and fused decode-matmul kernels for small batches.

Optional: Triton comes with the ``gpu`` extra (``pip install thawed[gpu]``; CUDA builds of torch
carry it). Every kernel here has its codec's pure-PyTorch ``decode`` as the reference, and the tests
compare the two on odd shapes, natively on CUDA and under ``TRITON_INTERPRET=1`` on the CPU.

Modules (imported lazily, only where a kernel runs):

- ``rtn``, ``cvxq``, ``hyperc``: ``decode(enc, spec, dtype, out=None)`` and the fused small-batch
  matmul ``prepare(enc, spec) -> weight`` / ``matmul(x, weight)``;
- ``rans``: the interleaved-rANS lane decoder that ``lossless`` and ``nwc`` use on the device.

``kernels_available(device)`` says whether these paths can run for ``device``: Triton imports and
the device is CUDA, or the Triton interpreter is on (tests).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["kernels_available", "interpreting", "triton_missing_reason"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_missing_reason() -> str | None:
    """None when Triton imports, else why not (shown in logs and ``inspect``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not installed ({e.__class__.__name__}: {e}); pip install 'thawed[gpu]'"
    return None


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``."""
    dev = torch.device(device)
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpreting())):
        return False  # decided before importing Triton: a CPU run never pays for that import
    return triton_missing_reason() is None
