"""runtime/threads.py: the calling thread's OpenMP team size is set for a block and restored, and
other threads keep theirs; decoding inside the block gives the same tensor."""

from __future__ import annotations

import threading

import pytest
import torch

from thawed.codecs.base import TensorSpec
from thawed.codecs.rtn import Rtn
from thawed.runtime.threads import omp_threads, one_omp_thread, set_omp_threads

pytestmark = pytest.mark.skipif(omp_threads() is None, reason="torch without its bundled libgomp")


def test_one_omp_thread_sets_and_restores_the_callers_team_only():
    def other_thread() -> int | None:
        seen: list[int | None] = []
        t = threading.Thread(target=lambda: seen.append(omp_threads()))
        t.start()
        t.join()
        return seen[0]

    before = omp_threads()
    set_omp_threads(3)
    try:
        outside = other_thread()
        with one_omp_thread():
            assert omp_threads() == 1
            assert torch.get_num_threads() == 1  # torch sizes its parallel regions by it
            assert other_thread() == outside  # other threads keep their own setting
        assert omp_threads() == 3
    finally:
        set_omp_threads(before)


def test_decoding_on_one_thread_gives_the_same_weights():
    torch.manual_seed(0)
    w = torch.randn(257, 300) * 0.05
    spec = TensorSpec("w", (257, 300), torch.float32, "linear")
    enc = Rtn(bits=4, group_size=64).encode(w, spec, None)
    ref = Rtn.decode(enc, spec, {}, torch.device("cpu"), torch.float32)
    with one_omp_thread():
        got = Rtn.decode(enc, spec, {}, torch.device("cpu"), torch.float32)
    assert torch.equal(got, ref)
