"""Per-thread torch CPU thread counts for decoders: run the calling thread's torch ops on one thread.

Used by the compiled nwc decode's band threads, and by the runtime's decoding threads (the early
decoder, the prefetcher, the repack pool, the main thread while it decodes: runtime/early.py,
runtime/model.py), which get their parallelism from decoding several tensors at once.

``torch.set_num_threads(n)`` is process-wide and reaches two thread pools: OpenMP (ATen's
elementwise ops; a per-thread team size that torch sets to ``n`` on a thread's first parallel op)
and MKL (the matmuls; ``mkl_set_num_threads(n)``, which MKL obeys over OpenMP's per-thread value).
A decoder that brings its own parallelism -- one Python thread per part -- wants every part on
one thread: a team of two per small matmul pays a barrier per op, and on a busy 2-core machine
each barrier waits for a descheduled thread (measured here, one [4032, 64] x [64, 64] matmul with
torch.set_num_threads(2) in the process: 4.5 ns per decoded weight on one thread, 147-325 ns with
MKL's team of two). ``one_thread()`` sets, for the calling thread only and for the block,
OpenMP's team size (after torch's own per-thread initialisation, which would reset it) and MKL's
thread-local count to 1, then restores both.

Works with the libgomp and the MKL built into the CPU wheels of torch; where a library or symbol is
missing (another build) that half is skipped, and the ops run as torch would run them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from functools import lru_cache
from typing import Iterator

import torch

__all__ = ["one_thread", "set_thread_count", "omp_threads"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _libs() -> tuple[object | None, object | None]:
    """(libgomp, MKL's MKL_Set_Num_Threads_Local), or None each."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    gomp = mkl = None
    try:
        gomp = ctypes.CDLL(os.path.join(lib_dir, "libgomp.so.1"))
        gomp.omp_get_max_threads.restype = ctypes.c_int
        gomp.omp_set_num_threads.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        log.debug("no libgomp in %s: the OpenMP team size is left as torch sets it", lib_dir)
        gomp = None
    try:
        # the C entry point (mkl_set_num_threads_local is the Fortran one, which takes a pointer)
        mkl = ctypes.CDLL(os.path.join(lib_dir, "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
        mkl.restype = ctypes.c_int
        mkl.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        log.debug("no MKL symbols in %s: MKL's thread count is left as torch sets it", lib_dir)
        mkl = None
    return gomp, mkl


def omp_threads() -> int | None:
    """The calling thread's OpenMP team size, or None without libgomp."""
    gomp, _ = _libs()
    return None if gomp is None else int(gomp.omp_get_max_threads())


def set_thread_count(n: int) -> None:
    """The calling thread's OpenMP team and MKL thread count at ``n`` from now on (a thread pool's
    initializer). torch's lazy per-thread initialisation runs first, which would reset the team."""
    gomp, mkl = _libs()
    torch.get_num_threads()
    if gomp is not None:
        gomp.omp_set_num_threads(int(n))
    if mkl is not None:
        mkl(int(n))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The calling thread's OpenMP team and MKL thread count at 1 for the block, then restored."""
    gomp, mkl = _libs()
    torch.get_num_threads()  # torch's lazy per-thread init sets the team to the process count: let it run first
    before_omp = gomp.omp_get_max_threads() if gomp is not None else None
    if gomp is not None:
        gomp.omp_set_num_threads(1)
    before_mkl = mkl(1) if mkl is not None else None  # returns the previous local count (0: MKL's global one)
    try:
        yield
    finally:
        if mkl is not None:
            mkl(before_mkl)
        if gomp is not None:
            gomp.omp_set_num_threads(before_omp)
