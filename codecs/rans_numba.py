"""Compiled (numba) decoder for ``thawed.codecs.rans`` streams: the CPU fast path.

Gives the same symbols as the pure-PyTorch reference ``rans.decode_reference``, bit for bit
(``tests/test_rans.py`` compares them on odd sizes, one table and many). ``rans.decode`` picks this
path when numba imports and the stream is on the CPU; without numba it logs one line and uses
the reference.

Why numba (measured; docs/NWC.md "Decode throughput"): the reference runs one Python iteration of
~11 small torch ops per *step* across all lanes, so a tensor with few lanes (nwc: 2048 steps, a few
hundred lanes) pays ~20 us per step; here every lane is a plain scalar loop of a few ns per
symbol. ``constriction`` cannot read this stream layout (its ANS coder keeps a 64-bit state and
emits 32-bit words), ``torch.compile`` does not turn a data-dependent sequential loop into one
kernel, and a ``cpp_extension`` needs a C++ compiler at run time; numba ships as a wheel and caches
its machine code on disk (``cache=True``).

Threads: the kernels release the GIL (``nogil``); the lanes are cut into contiguous ranges, one per
thread (``torch.get_num_threads()``, so ``--threads`` governs both), run on short-lived Python
threads. numba's own parallel layer is not used: its default (workqueue) layer must not be
entered by two threads at once, and the runtime decodes from a prefetch thread and the main thread.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from types import ModuleType
from typing import Callable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["available", "kernels", "used_tables", "decode_lanes", "encode_lanes", "assemble_f32"]

MIN_SYMBOLS_PER_THREAD = 1 << 16  # below this a second thread costs more than it saves
MAX_TABLES = (1 << 15) - 1  # table ids travel as int16


@lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The compiled kernels, or None when numba is unavailable (logged once)."""
    try:
        from . import _rans_kernels
    except Exception as exc:  # ImportError, or numba failing to initialise on this platform
        log.warning("rANS: numba is unavailable (%s: %s); entropy decoding uses the pure-PyTorch reference, "
                    "10-100x slower on the CPU -- `pip install numba` to fix", type(exc).__name__, exc)
        return None
    return _rans_kernels


def kernels() -> ModuleType:
    """The compiled kernels module (``_rans_kernels``); raises ``CodecError`` without numba."""
    k = _kernels()
    if k is None:
        from .errors import CodecError

        raise CodecError("the compiled CPU kernels need numba: `pip install numba`")
    return k


def available() -> bool:
    """True when the compiled decoder can run (numba imports)."""
    return _kernels() is not None


def _ids(table_of: Tensor | None) -> np.ndarray:
    """Table ids as the kernels take them: int16 (an empty array for "all table 0")."""
    if table_of is None:
        return np.zeros(0, dtype=np.int16)
    return table_of.detach().reshape(-1).to(torch.int16).contiguous().numpy()


def used_tables(tables: Tensor, table_of: Tensor | None) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (used [U] int64 table ids, local_of [T] int32 id -> 0..U-1 or -1, number of ids outside [0, T))."""
    local_of, used, bad = _kernels().used_tables(_ids(table_of), tables.shape[0])
    return used, local_of, int(bad)


def decode_lanes(states: Tensor, words: Tensor, lane_words: Tensor, tables: Tensor, used: np.ndarray,
                 local_of: np.ndarray, precision_bits: int, n: int, table_of: Tensor | None,
                 threads: int | None = None) -> tuple[Tensor, int, int]:
    """Decode every lane -> ``(symbols [n] uint8, lanes not back at L, lanes with a wrong word count)``.

    Inputs must be checked by the caller (states >= L, word counts >= 0 summing to ``words.numel()``,
    table ids in range, the ``used`` rows of ``tables`` >= 0 and summing to ``2**precision_bits``):
    the kernels do not check array bounds.
    """
    k = _kernels()
    tab = tables.detach().to(torch.int32).contiguous().numpy()
    slot_sym, freq_cum = k.slot_tables(tab, used, precision_bits)
    st = states.detach().contiguous().numpy().view(np.uint32)
    wd = words.detach().contiguous().numpy().view(np.uint16)
    if wd.shape[0] == 0:
        wd = np.zeros(1, dtype=np.uint16)  # the kernel always reads a word (and uses it only when due)
    lw = lane_words.detach().to(torch.int64)
    end = torch.cumsum(lw, 0)
    start = (end - lw).numpy()
    end = end.numpy()
    tid = _ids(table_of)
    lanes = st.shape[0]
    out = np.empty(n, dtype=np.uint8)
    bounds = _bounds(lanes, n, threads)
    bad = np.zeros((len(bounds) - 1, 2), dtype=np.int64)

    def run(i: int) -> None:
        bad[i] = k.decode_range(st, wd, start, end, slot_sym, freq_cum, tid, local_of, precision_bits,
                                n, bounds[i], bounds[i + 1], out)

    _in_threads(run, len(bounds) - 1)
    tot = bad.sum(0)
    return torch.from_numpy(out), int(tot[0]), int(tot[1])


def encode_lanes(sym: Tensor, table_of: Tensor | None, freq: Tensor, cum: Tensor, alphabet: int,
                 precision_bits: int, lanes: int, threads: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``rans.encode``'s loop compiled, lanes split over threads -> (states [lanes] int32, words [W]
    int16, lane_words [lanes] int32), identical to the torch loop. Inputs checked by the caller:
    ``sym`` [n] uint8, ``table_of`` [n] int64 ids or None, ``freq``/``cum`` [T * A] int64 with every
    coded symbol's frequency >= 1."""
    k = _kernels()
    s = sym.detach().reshape(-1).to(torch.uint8).contiguous().numpy()
    n = s.shape[0]
    tid = (np.zeros(0, dtype=np.int64) if table_of is None
           else table_of.detach().reshape(-1).to(torch.int64).contiguous().numpy())
    f = freq.detach().to(torch.int64).contiguous().numpy()
    c = cum.detach().to(torch.int64).contiguous().numpy()
    steps = -(-n // lanes)
    states = np.empty(lanes, dtype=np.uint32)
    counts = np.empty(lanes, dtype=np.int32)
    buf = np.empty((lanes, steps), dtype=np.uint16)
    bounds = _bounds(lanes, n, threads)
    _in_threads(lambda i: k.encode_range(s, tid, f, c, alphabet, precision_bits, lanes, n, states, counts, buf,
                                         bounds[i], bounds[i + 1]), len(bounds) - 1)
    end = np.cumsum(counts, dtype=np.int64)
    start = end - counts
    words = np.empty(int(end[-1]) if lanes else 0, dtype=np.uint16)
    _in_threads(lambda i: k.gather_words(buf, counts, start, words, bounds[i], bounds[i + 1]), len(bounds) - 1)
    # an empty numpy array becomes a tensor with stride 0, which the file writer cannot view as bytes
    wt = torch.from_numpy(words.view(np.int16)) if words.size else torch.zeros(0, dtype=torch.int16)
    return torch.from_numpy(states.view(np.int32)), wt, torch.from_numpy(counts)


def assemble_f32(exp: Tensor, rest: Tensor, threads: int | None = None) -> Tensor:
    """``lossless`` float32 values from decoded exponents [n] uint8 and byte planes ``rest`` [3, n]
    uint8 (CPU) -> [n] float32, bit for bit what ``Lossless.decode``'s torch code builds."""
    k = _kernels()
    e = exp.detach().contiguous().numpy()
    r = rest.detach().contiguous().numpy()
    n = e.shape[0]
    out = np.empty(n, dtype=np.uint32)
    bounds = _bounds(n, n, threads)
    _in_threads(lambda i: k.assemble_f32(e, r, out, bounds[i], bounds[i + 1]), len(bounds) - 1)
    return torch.from_numpy(out.view(np.float32))


def _bounds(items: int, work: int, threads: int | None) -> list[int]:
    """Cut ``items`` (lanes, values) into one contiguous range per thread; small work stays on one."""
    threads = torch.get_num_threads() if threads is None else threads
    parts = max(1, min(threads, items, work // MIN_SYMBOLS_PER_THREAD))
    return [items * i // parts for i in range(parts + 1)]


def _in_threads(run: Callable[[int], None], parts: int) -> None:
    """``run(0..parts-1)``: part 0 on the calling thread, the others on short-lived threads (the
    kernels release the GIL); an exception in any part is raised here."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            run(i)
        except BaseException as exc:  # surfaced on the calling thread below
            errors.append(exc)

    workers = [threading.Thread(target=guarded, args=(i,), name=f"thawed-decode-{i}", daemon=True)
               for i in range(1, parts)]
    for w in workers:
        w.start()
    guarded(0)
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
