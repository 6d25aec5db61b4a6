"""codecs/threads.py: the calling thread's torch thread count (OpenMP team and MKL count) is set for
a block and restored, a thread pool's initializer setting holds past torch's per-thread init, other
threads keep theirs, and decoding inside the block gives the same tensor."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from thawed.codecs.base import TensorSpec
from thawed.codecs.rtn import Rtn
from thawed.codecs.threads import omp_threads, one_thread, set_thread_count

pytestmark = pytest.mark.skipif(omp_threads() is None, reason="torch without its bundled libgomp")


def test_one_thread_sets_and_restores_the_callers_count_only():
    def other_thread() -> int:
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with one_thread():
            assert omp_threads() == 1
            assert torch.get_num_threads() == 1  # torch sizes its parallel regions by it
            assert other_thread() == 3  # other threads keep the process-wide count
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_pool_initializer_setting_survives_torchs_per_thread_init():
    """The early decoder's and the repack pool's initializer: set in a fresh thread before its
    first torch op, which would otherwise reset the team to the process-wide count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(1, initializer=set_thread_count, initargs=(1,)) as pool:
            seen = pool.submit(lambda: (torch.ones(4096).sum(), torch.get_num_threads(), omp_threads())).result()
        assert seen[1:] == (1, 1)
    finally:
        torch.set_num_threads(before)


def test_decoding_on_one_thread_gives_the_same_weights():
    torch.manual_seed(0)
    w = torch.randn(257, 300) * 0.05
    spec = TensorSpec("w", (257, 300), torch.float32, "linear")
    enc = Rtn(bits=4, group_size=64).encode(w, spec, None)
    ref = Rtn.decode(enc, spec, {}, torch.device("cpu"), torch.float32)
    with one_thread():
        got = Rtn.decode(enc, spec, {}, torch.device("cpu"), torch.float32)
    assert torch.equal(got, ref)
