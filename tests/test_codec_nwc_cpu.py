"""``nwc``'s compiled CPU decode (``nwc_net.decode_weight_cpu`` and its kernels) against the
pure-PyTorch reference (``decode_columns``, then the transpose and row scale), on odd shapes,
several rate indices, tall columns cut into row blocks, 1-3 threads and under ``inference_mode``."""

from __future__ import annotations

import pytest
import torch

from thawed.codecs import EncodeContext, TensorSpec, rans_numba
from thawed.codecs.nwc import WEIGHTS_DIR, Nwc, load_network
from thawed.codecs.nwc_net import ALPHABET, CHUNK, decode_columns, decode_weight_cpu

CPU = torch.device("cpu")
SHIPPED = WEIGHTS_DIR / "default.safetensors"

pytestmark = [pytest.mark.skipif(not rans_numba.available(), reason="numba is not installed"),
              pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped network")]


def _reference(state: dict, sym: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    cols, p = sym.shape
    out = decode_columns(state, sym.view(cols, p // CHUNK, CHUNK), levels)
    return (out[:, :rows].t() * scale[:, None]).contiguous()


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.isfinite(got).all()
    # float32 round-off of values ~|ref|: the only change is the order of the first layer's sums
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=2e-6 * float(ref.abs().max()))


# (rows, cols, block, threads, rate indices): rows not a multiple of 16, one column, tall columns
# cut into row blocks (block < chunks per column), blocks of a few columns, every rate index mixed
@pytest.mark.parametrize("rows,cols,block,threads,n_levels", [
    (1, 1, 4096, 1, 1), (17, 7, 4096, 1, 3), (40, 333, 64, 2, 5), (1030, 5, 16, 2, 2), (100, 50, 48, 3, 20),
    (576, 40, 4096, 2, 4), (2000, 19, 300, 1, 6)])
def test_compiled_decode_equals_reference(rows: int, cols: int, block: int, threads: int, n_levels: int) -> None:
    state = load_network("default").decoder
    grid = state["log_gain"].shape[0]
    g = torch.Generator().manual_seed(rows * 31 + cols)
    p = -(-rows // CHUNK) * CHUNK
    sym = torch.randint(0, ALPHABET, (cols, p), dtype=torch.uint8, generator=g)
    pick = torch.randperm(grid, generator=g)[:n_levels]
    levels = pick[torch.randint(0, n_levels, (cols,), generator=g)].to(torch.uint8)
    scale = (torch.rand(rows, generator=g) + 0.01).half().float()
    ref = _reference(state, sym, levels, scale, rows)
    got = decode_weight_cpu(state, sym, levels, scale, rows, block, threads)
    _close(got, ref)
    with torch.inference_mode():  # as the runtime decodes: worker threads write inference tensors
        assert torch.equal(decode_weight_cpu(state, sym, levels, scale, rows, block, threads), got)


def test_compiled_kernels_match_their_torch_expressions() -> None:
    """The two kernels alone, bit for bit: latents + one-hot (+ the transposed residual), and the
    scaled store of a block into its rows and columns of the weight."""
    k = rans_numba.kernels()
    g = torch.Generator().manual_seed(5)
    cols, rows, c0, c1, r0, r1 = 9, 45, 2, 7, 16, 48
    nb, m = c1 - c0, (r1 - r0) // CHUNK
    p = -(-rows // CHUNK) * CHUNK
    sym = torch.randint(0, ALPHABET, (cols, p), dtype=torch.uint8, generator=g)
    slot = torch.randint(0, 3, (cols,), generator=g)
    gain = torch.rand(3, CHUNK, generator=g) + 0.1
    b3 = torch.randn(CHUNK, generator=g)
    x = torch.full((nb * m, CHUNK + 3), float("nan"))
    acc = torch.full((CHUNK, nb * m), float("nan"))
    k.nwc_inputs(sym.numpy(), slot.numpy(), gain.numpy(), b3.numpy(), c0, c1, r0, r1, x.numpy(), acc.numpy())
    blk = sym[c0:c1, r0:r1].reshape(nb, m, CHUNK).transpose(0, 1)  # block row q * nb + j
    z = ((blk.to(torch.float32) - 128) * gain[slot[c0:c1]][None, :, :]).reshape(-1, CHUNK)
    assert torch.equal(x[:, :CHUNK], z)
    assert torch.equal(x[:, CHUNK:], torch.nn.functional.one_hot(slot[c0:c1], 3).float().repeat(m, 1))
    assert torch.equal(acc, (z + b3).t())
    acc = torch.randn(CHUNK, nb * m, generator=g)
    scale = torch.rand(rows, generator=g)
    out = torch.zeros(rows, cols)
    k.nwc_store(acc.numpy(), c0, c1, r0, r1, scale.numpy(), out.numpy())
    want = torch.zeros(rows, cols)
    vals = acc.view(CHUNK, m, nb).permute(1, 0, 2).reshape(m * CHUNK, nb)[: rows - r0]  # row r0 + 16 q + ch
    want[r0:r0 + vals.shape[0], c0:c1] = vals * scale[r0:r0 + vals.shape[0], None]
    assert torch.equal(out, want)


@pytest.mark.parametrize("threads", [1, 2])
def test_nwc_decode_fast_path_equals_reference_path(threads: int) -> None:
    """A real encoded tensor (the shipped network, several rate indices): the compiled decode and the
    pure-PyTorch one (torch rANS, ``decode_columns``) give the same weights to round-off."""
    g = torch.Generator().manual_seed(threads)
    w = torch.randn(83, 61, generator=g) * torch.linspace(0.01, 0.1, 61)
    imp = torch.rand(61, generator=g)
    spec = TensorSpec("t.weight", tuple(w.shape), w.dtype, "linear")
    codec = Nwc(lam=256.0, steps=37)
    enc = codec.encode(w, spec, EncodeContext("t.weight", importance=imp))
    assert len(torch.unique(enc.fields["levels"])) >= 2
    shared = codec.shared_tensors()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = Nwc.decode(enc, spec, shared, CPU, torch.float32)
        ref = Nwc.decode(enc, spec, shared, CPU, torch.float32, rans_backend="torch")
    finally:
        torch.set_num_threads(before)
    _close(got, ref)


def test_one_thread_holds_in_a_fresh_thread_and_restores() -> None:
    """The band threads' guard: one OpenMP thread (and one MKL thread) even in a thread whose first
    torch op would reset the team to the process count, restored afterwards."""
    import ctypes
    import os
    import threading

    from thawed.codecs.threads import _libs, one_thread

    gomp, mkl = _libs()
    if gomp is None:
        pytest.skip("torch has no bundled libgomp here")
    seen: list[tuple[int, int | None, int, int | None]] = []
    mkl_max = None
    if mkl is not None:
        lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        mkl_max = ctypes.CDLL(lib).MKL_Get_Max_Threads
        mkl_max.restype = ctypes.c_int

    def fresh() -> None:
        with one_thread():
            inside = (torch.get_num_threads(), mkl_max() if mkl_max else None)
        seen.append((*inside, torch.get_num_threads(), mkl_max() if mkl_max else None))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = threading.Thread(target=fresh)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen[0][0] == 1 and seen[0][1] in (None, 1)
    assert seen[0][2] == 2 and seen[0][3] in (None, 2)  # restored: the process count again
