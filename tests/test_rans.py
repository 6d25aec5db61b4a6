"""Interleaved rANS (one coder, an optional table index): exact round trips, rate near the entropy,
integrity checks on damaged streams, and the compiled (numba) decoder equal to the pure-PyTorch
reference bit for bit."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

import thawed.codecs
from thawed.codecs import CodecError, CorruptPayloadError
from thawed.codecs import rans, rans_numba
from thawed.codecs.rans import RansStream

BACKENDS = ["torch"] + (["numba"] if rans_numba.available() else [])


class Coded:
    """A symbol sequence coded with one fitted table (as ``lossless`` does)."""

    def __init__(self, sym: torch.Tensor, alphabet: int, precision_bits: int = rans.DEFAULT_PRECISION, **kw) -> None:
        self.precision_bits = precision_bits
        self.freq = rans.fit_table(sym, alphabet, precision_bits)
        self.st: RansStream = rans.encode(sym, self.freq, precision_bits, **kw)


def _decode(c: Coded, backend: str = "auto", **overrides) -> torch.Tensor:
    args = dict(states=c.st.states, words=c.st.words, lane_words=c.st.lane_words, tables=c.freq,
                precision_bits=c.precision_bits, n=c.st.n)
    args.update(overrides)
    return rans.decode(**args, backend=backend)


def _round_trip(sym: torch.Tensor, alphabet: int, **kw) -> Coded:
    c = Coded(sym, alphabet, **kw)
    st = c.st
    assert c.freq.dtype == torch.int32 and st.states.dtype == torch.int32
    assert st.words.dtype == torch.int16 and st.lane_words.dtype == torch.int32
    assert int(c.freq.sum()) == 1 << c.precision_bits
    assert int(st.lane_words.sum()) == st.words.numel()
    for backend in BACKENDS:
        out = _decode(c, backend)
        assert out.dtype == torch.uint8 and torch.equal(out, sym.to(torch.uint8)), backend
    return c


def _entropy_bits(sym: torch.Tensor, alphabet: int) -> float:
    p = torch.bincount(sym, minlength=alphabet).double() / sym.numel()
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) * sym.numel()


@pytest.mark.parametrize("n", [0, 1, 2, 7, 511, 512, 513, 1000, 5000])
@pytest.mark.parametrize("alphabet", [1, 2, 5, 32, 256])
def test_round_trip_uniform(n: int, alphabet: int) -> None:
    sym = torch.randint(0, alphabet, (n,), generator=torch.Generator().manual_seed(n * 7 + alphabet))
    _round_trip(sym, alphabet)


@pytest.mark.parametrize("lanes", [1, 3, 64, 1000, 3001])
def test_round_trip_explicit_lanes(lanes: int) -> None:
    sym = torch.randint(0, 256, (3001,), generator=torch.Generator().manual_seed(lanes))
    c = _round_trip(sym, 256, lanes=lanes)
    assert c.st.lanes == lanes


@pytest.mark.parametrize("precision_bits", [8, 10, 12, 15])
def test_skewed_rate_is_near_entropy(precision_bits: int) -> None:
    gen = torch.Generator().manual_seed(precision_bits)
    probs = torch.softmax(torch.randn(256, generator=gen) * 2.5, 0)
    sym = torch.multinomial(probs, 200_000, replacement=True, generator=gen)
    c = _round_trip(sym, 256, precision_bits=precision_bits)
    st = c.st
    assert st.lanes == math.ceil(200_000 / rans.TARGET_STEPS)
    coded = st.words.numel() * 16
    assert st.nbytes * 8 - coded == st.lanes * 64  # state and word count per lane (the table is the caller's)
    ent = _entropy_bits(sym, 256)
    # The coder spends within ~0.1 % of the quantised model's cross-entropy (plus the final state)...
    model_bits = float(rans.code_lengths(sym, torch.zeros_like(sym), c.freq, precision_bits).sum())
    assert coded <= model_bits * 1.002 + 32 * st.lanes, (coded, model_bits)
    # ...and at 12+ bits of precision that model is within 1 % of the empirical entropy.
    if precision_bits >= 12:
        assert coded <= ent * 1.01 + 32 * st.lanes, (coded / sym.numel(), ent / sym.numel())


def test_very_skewed_and_single_symbol() -> None:
    sym = torch.zeros(100_000, dtype=torch.int64)
    sym[::997] = 255
    sym[5] = 17
    c = _round_trip(sym, 256)
    assert int(c.freq[17]) >= 1 and int(c.freq[255]) >= 1  # rare symbols keep a slot
    one = _round_trip(torch.full((10_000,), 3), 8)
    assert one.st.words.numel() == 0 and int(one.freq[3]) == 1 << one.precision_bits
    assert (one.st.states.to(torch.int64) & 0xFFFFFFFF).eq(rans.RANS_L).all()


def test_frequency_quantisation_keeps_present_symbols() -> None:
    counts = torch.zeros(256, dtype=torch.int64)
    counts[0] = 10**9
    counts[1:] = 1
    f = rans.quantize_frequencies(counts, 8)  # 256 present symbols in M = 256 slots
    assert int(f.sum()) == 256 and (f >= 1).all()
    f = rans.quantize_frequencies(counts, 12)
    assert int(f.sum()) == 4096 and (f[1:] == 1).all()
    counts = torch.tensor([0, 5, 0, 3, 1])
    f = rans.quantize_frequencies(counts, 10)
    assert int(f.sum()) == 1024 and f[0] == 0 and f[2] == 0 and (f[[1, 3, 4]] >= 1).all()
    with pytest.raises(CodecError, match="precision_bits"):
        rans.quantize_frequencies(torch.ones(300, dtype=torch.int64), 8)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(CodecError, match=r"\[0, 4\)"):
        rans.fit_table(torch.tensor([0, 4]), 4)
    with pytest.raises(CodecError, match=r"\[0, 4\)"):
        rans.encode(torch.tensor([0, 4]), rans.fit_table(torch.tensor([0, 1]), 4))
    with pytest.raises(CodecError, match="alphabet"):
        rans.fit_table(torch.tensor([0]), 257)
    with pytest.raises(CodecError, match="precision_bits"):
        rans.fit_table(torch.tensor([0]), 4, precision_bits=16)
    freq = rans.fit_table(torch.tensor([0, 1]), 4)  # symbols 2, 3 have frequency 0
    with pytest.raises(CodecError, match="frequency 0"):
        rans.encode(torch.tensor([0, 2]), freq)
    with pytest.raises(CodecError, match="table index per symbol"):
        rans.encode(torch.tensor([0, 1]), torch.stack([freq, freq]))
    with pytest.raises(CodecError, match="rows summing"):
        rans.encode(torch.tensor([0, 1]), freq + 1)


# ---- many tables: symbol i coded with row table_of[i] (as nwc does) -------------------------------
def _tables(t: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([rans.quantize_frequencies(torch.softmax(torch.randn(256, generator=g) * 3, 0) + 1e-12, k)
                        for _ in range(t)]).to(torch.int32)


@pytest.mark.parametrize("n,steps,k", [(1, 4, 14), (17, 4, 12), (1000, 7, 15), (4099, 1024, 8), (50_000, 300, 14),
                                       (70_001, 2048, 14)])
def test_table_index_round_trip_exact(n: int, steps: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    tabs = _tables(5, k, n)
    tid = torch.randint(0, 5, (n,), generator=g)
    sym = torch.multinomial(tabs[tid].double(), 1, generator=g).squeeze(1)
    st = rans.encode(sym, tabs, k, table_of=tid, steps=steps)
    assert st.lanes == max(1, math.ceil(n / steps))
    for backend in BACKENDS:
        for ids in (tid, tid.to(torch.int16)):
            out = rans.decode(st.states, st.words, st.lane_words, tabs, k, n, table_of=ids, backend=backend)
            assert out.dtype == torch.uint8 and torch.equal(out.long(), sym), backend
    ideal = float(rans.code_lengths(sym, tid, tabs, k).sum())
    assert st.words.numel() * 16 <= ideal + 32 * st.lanes + 16  # the coder is within its flush cost of ideal


def test_table_index_corruption_is_detected() -> None:
    g = torch.Generator().manual_seed(1)
    tabs = _tables(3, 14, 1)
    tid = torch.randint(0, 3, (20_000,), generator=g)
    sym = torch.multinomial(tabs[tid].double(), 1, generator=g).squeeze(1)
    st = rans.encode(sym, tabs, 14, table_of=tid, steps=512)
    for backend in BACKENDS:
        for i in range(0, st.words.numel(), max(1, st.words.numel() // 7)):
            w = st.words.clone()
            w[i] ^= 0x1234
            with pytest.raises(CorruptPayloadError, match="payload is damaged"):
                rans.decode(st.states, w, st.lane_words, tabs, 14, st.n, table_of=tid, backend=backend)
        with pytest.raises(CorruptPayloadError, match="word counts"):
            rans.decode(st.states, st.words[:-1], st.lane_words, tabs, 14, st.n, table_of=tid, backend=backend)
        bad_ids = tid.clone()
        bad_ids[77] = 3
        with pytest.raises(CorruptPayloadError, match=r"outside \[0, 3\)"):
            rans.decode(st.states, st.words, st.lane_words, tabs, 14, st.n, table_of=bad_ids, backend=backend)
        with pytest.raises(CorruptPayloadError, match="table indices for"):
            rans.decode(st.states, st.words, st.lane_words, tabs, 14, st.n, table_of=tid[:-1], backend=backend)
    bad = tabs.clone()
    bad[0, 0] += 1
    with pytest.raises(CorruptPayloadError, match="do not sum"):
        rans.check_tables(bad, 14)
    unused_bad = torch.cat([tabs, bad[:1]])  # a broken row no symbol uses does not matter
    for backend in BACKENDS:
        out = rans.decode(st.states, st.words, st.lane_words, unused_bad, 14, st.n, table_of=tid, backend=backend)
        assert torch.equal(out.long(), sym)


# ---- the compiled decoder against the reference ---------------------------------------------------
needs_numba = pytest.mark.skipif(not rans_numba.available(), reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("n,lanes,threads", [(1, 1, 2), (33, 33, 2), (1000, 31, 1), (131_073, 65, 2),
                                             (200_003, 391, 3), (300_000, 4096, 2)])
def test_numba_equals_reference_on_odd_sizes(n: int, lanes: int, threads: int) -> None:
    """Odd sizes, lane counts that are not multiples of the kernel's lane block, ragged last steps,
    several threads (each a range of lanes): the same symbols as the reference, bit for bit."""
    g = torch.Generator().manual_seed(n + lanes)
    sym = torch.multinomial(torch.softmax(torch.randn(256, generator=g) * 2, 0), n, replacement=True, generator=g)
    c = Coded(sym, 256, precision_bits=11, lanes=lanes)
    ref = _decode(c, "torch")
    tab = c.freq[None]
    used, local_of, bad = rans_numba.used_tables(tab, None)
    fast, bad_state, bad_words = rans_numba.decode_lanes(c.st.states, c.st.words, c.st.lane_words, tab, used,
                                                         local_of, 11, n, None, threads=threads)
    assert bad == bad_state == bad_words == 0
    assert torch.equal(fast, ref) and torch.equal(ref, sym.to(torch.uint8))
    # many tables, ids as int16 (what nwc passes)
    tabs = _tables(40, 14, n)
    tid = torch.randint(0, 40, (n,), generator=g)
    sym2 = torch.multinomial(tabs[tid].double(), 1, generator=g).squeeze(1)
    st = rans.encode(sym2, tabs, 14, table_of=tid, lanes=lanes)
    a = rans.decode(st.states, st.words, st.lane_words, tabs, 14, n, table_of=tid.to(torch.int16), backend="numba")
    b = rans.decode(st.states, st.words, st.lane_words, tabs, 14, n, table_of=tid, backend="torch")
    assert torch.equal(a, b) and torch.equal(a.long(), sym2)


@needs_numba
@pytest.mark.parametrize("n,lanes,tables", [(1, 1, 1), (7, 3, 1), (1000, 31, 1), (5, 9, 1), (50_001, 97, 40),
                                            (2047, 2047, 3)])
def test_numba_encoder_equals_torch_encoder(n: int, lanes: int, tables: int) -> None:
    """The compiled encoder writes the torch loop's stream bit for bit (states, words, word counts),
    one table and many, ragged last steps, more lanes than symbols."""
    g = torch.Generator().manual_seed(n + lanes)
    tabs = _tables(tables, 12, n)
    tid = torch.randint(0, tables, (n,), generator=g) if tables > 1 else None
    probs = tabs[tid].double() if tid is not None else tabs[0].double().expand(n, -1)
    sym = torch.multinomial(probs, 1, generator=g).squeeze(1)
    args = (sym, tabs if tables > 1 else tabs[0], 12)
    a = rans.encode(*args, table_of=tid, lanes=lanes, backend="numba")
    b = rans.encode(*args, table_of=tid, lanes=lanes, backend="torch")
    for x, y in ((a.states, b.states), (a.words, b.words), (a.lane_words, b.lane_words)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert (a.n, a.lanes) == (b.n, b.lanes)
    assert all(t.stride() == (1,) for t in (a.states, a.words, a.lane_words))  # even when empty (the writer views bytes)


@needs_numba
def test_numba_flags_the_same_damaged_lanes(stream: tuple[torch.Tensor, Coded]) -> None:
    """A damaged stream fails the same end-of-stream check on both decoders, with the same counts
    of bad lanes (so they read the same words, also past a lane's end)."""
    _, c = stream
    lw = c.st.lane_words.clone()
    lw[0] += 1
    lw[1] -= 1
    words = c.st.words.clone()
    words[5] ^= 0x0101
    last = c.st.lane_words.clone()
    last[-1] -= 1  # the last lane reads past the final word
    last[0] += 1
    for kw in ({"lane_words": lw}, {"words": words}, {"lane_words": last}):
        msgs = []
        for backend in ("torch", "numba"):
            with pytest.raises(CorruptPayloadError, match="payload is damaged") as exc:
                _decode(c, backend, **kw)
            msgs.append(str(exc.value))
        assert msgs[0] == msgs[1]


def test_fallback_without_numba_logs_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                          stream: tuple[torch.Tensor, Coded]) -> None:
    sym, c = stream
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.delitem(sys.modules, "thawed.codecs._rans_kernels", raising=False)
    monkeypatch.delattr(thawed.codecs, "_rans_kernels", raising=False)
    rans_numba._kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="thawed.codecs.rans_numba"):
            for _ in range(3):
                assert torch.equal(_decode(c), sym.to(torch.uint8))  # auto: the reference
            with pytest.raises(CodecError, match="'numba' needs numba"):
                _decode(c, "numba")
        lines = [r for r in caplog.records if r.name == "thawed.codecs.rans_numba"]
        assert len(lines) == 1 and "pure-PyTorch reference" in lines[0].getMessage()
        assert not rans_numba.available()
    finally:
        monkeypatch.undo()
        rans_numba._kernels.cache_clear()
    with pytest.raises(CodecError, match="backend must be one of"):
        _decode(c, "cuda")


# ---- damaged streams ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream() -> tuple[torch.Tensor, Coded]:
    gen = torch.Generator().manual_seed(0)
    sym = torch.multinomial(torch.softmax(torch.randn(256, generator=gen) * 2, 0), 50_000,
                            replacement=True, generator=gen)
    return sym, Coded(sym, 256)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tables_raise(stream: tuple[torch.Tensor, Coded], backend: str) -> None:
    _, c = stream
    st = c.st
    freq = c.freq.clone()
    freq[int(freq.argmax())] += 1
    with pytest.raises(CorruptPayloadError, match="frequencies sum to 4097"):
        _decode(c, backend, tables=freq)
    lw = st.lane_words.clone()
    lw[3] += 1
    with pytest.raises(CorruptPayloadError, match="lane word counts"):
        _decode(c, backend, lane_words=lw)
    with pytest.raises(CorruptPayloadError, match="lane word counts"):
        _decode(c, backend, words=st.words[:-1])
    with pytest.raises(CorruptPayloadError, match="'states' has 97 lanes but 'lane_words' has 98"):
        _decode(c, backend, states=st.states[:-1])
    with pytest.raises(CorruptPayloadError, match="'words'"):
        _decode(c, backend, words=st.words.to(torch.int32))
    states = st.states.clone()
    states[0] = 5
    with pytest.raises(CorruptPayloadError, match="below the rANS lower bound"):
        _decode(c, backend, states=states)
    with pytest.raises(CorruptPayloadError, match="precision_bits"):
        _decode(c, backend, precision_bits=20)
    with pytest.raises(CorruptPayloadError, match="lanes for"):
        _decode(c, backend, n=50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_words_are_detected(stream: tuple[torch.Tensor, Coded], backend: str) -> None:
    sym, c = stream
    st = c.st
    # words moved between lanes: totals still add up, so only the end-of-stream check can see it
    lw = st.lane_words.clone()
    lw[0] += 1
    lw[1] -= 1
    with pytest.raises(CorruptPayloadError, match="did not consume exactly their words"):
        _decode(c, backend, lane_words=lw)
    detected = 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        words = st.words.clone()
        i = int(torch.randint(0, words.numel(), (1,), generator=gen))
        words[i] = words[i] ^ (1 << int(torch.randint(0, 16, (1,), generator=gen)))
        try:
            out = _decode(c, backend, words=words)
        except CorruptPayloadError as exc:
            assert "did not return to the initial state" in str(exc)
            detected += 1
        else:
            assert not torch.equal(out, sym.to(torch.uint8)) or torch.equal(words, st.words)
    assert detected >= 18  # the final-state check catches nearly every single-bit error
    states = st.states.clone()
    states[7] = states[7] ^ (1 << 20)
    with pytest.raises(CorruptPayloadError, match="did not return"):
        _decode(c, backend, states=states)
    with pytest.raises(CorruptPayloadError):
        _decode(c, backend, words=torch.zeros_like(st.words))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda(stream: tuple[torch.Tensor, Coded]) -> None:
    sym, c = stream
    st = c.st
    out = rans.decode(st.states.cuda(), st.words.cuda(), st.lane_words.cuda(), c.freq.cuda(), c.precision_bits, st.n)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), sym.to(torch.uint8))
