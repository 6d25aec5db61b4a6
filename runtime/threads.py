"""Per-thread OpenMP team size for CPU decoding.

``torch.set_num_threads`` is process-wide. OpenMP's ``omp_set_num_threads`` sets the team size of
the *calling* thread only, and torch's CPU kernels size their parallel regions by it. Decoding runs
many short ops (unpack, scale, small matmuls) on tensors of a few MB: a team of two pays a barrier
per op, and on a busy machine each barrier waits for a descheduled thread. Measured on this
project's 2-core machine at load average ~3 (rtn b4 g128, one 1536x576 tensor): 19.6 ms to decode
with a team of two, 2.3-4.2 ms with one. So the runtime decodes with one OpenMP thread per
decoding thread (``one_omp_thread``) and gets parallelism from decoding several tensors at once
(the early decoder beside the load, runtime/early.py).

Works with the libgomp bundled in the CPU wheels of torch; with another OpenMP runtime (or none)
these calls do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from typing import Iterator

import torch

__all__ = ["omp_threads", "set_omp_threads", "one_omp_thread"]

log = logging.getLogger(__name__)

_LIB: list = []  # [ctypes library or None], resolved once per process


def _lib():
    if not _LIB:
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
        try:
            lib = ctypes.CDLL(path)
            lib.omp_get_max_threads.restype = ctypes.c_int
            _LIB.append(lib)
        except (OSError, AttributeError):
            log.debug("no %s: decoding keeps OpenMP's default team size", path)
            _LIB.append(None)
    return _LIB[0]


def omp_threads() -> int | None:
    """The calling thread's OpenMP team size, or None without libgomp."""
    lib = _lib()
    return None if lib is None else int(lib.omp_get_max_threads())


def set_omp_threads(n: int) -> None:
    """Set the calling thread's OpenMP team size (no-op without libgomp)."""
    lib = _lib()
    if lib is not None:
        lib.omp_set_num_threads(int(n))


@contextlib.contextmanager
def one_omp_thread() -> Iterator[None]:
    """Run the block's torch CPU ops on the calling thread alone, then restore its team size."""
    before = omp_threads()
    if before is None or before == 1:
        yield
        return
    set_omp_threads(1)
    try:
        yield
    finally:
        set_omp_threads(before)
