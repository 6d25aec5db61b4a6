"""The network of the neural weight codec (``nwc``): a rate-conditioned autoencoder for chunks of 16
row-normalised weights, a learned factorised entropy model, and the pure-torch decoder the runtime
runs from the file's shared state.

Rates: a grid of ``GRID`` Lagrange multipliers ``lambda_k = 2 ** (LOG2_LAM0 + k * LOG2_LAM_STEP)``
(loss ``MSE + bits / lambda_k`` per weight, rate ~ +0.25 bit per step). One network serves every
rate ("lambda-conditioned"): the index ``k`` selects a learned embedding added to the first hidden
layer of encoder and decoder, a per-channel quantiser gain ``exp(log_gain[k])`` and its own
factorised prior per latent channel. Importance levels raise ``k`` for important input columns.

    encoder (offline):  y = (x + MLP_e(x) + E_e[k]) * gain[k]           x: [N, 16] -> y: [N, 16]
    quantiser:          q = round(y), symbol = clamp(q + 128, 0, 255)
    decoder (runtime):  z = q / gain[k];  x^ = z + W3 relu(W2 relu(W1 z + b1 + E_d[k]) + b2) + b3

``decode_chunks`` is the decoder as plain tensor ops on the shared state (``decoder_state``); the
encoder uses the same function, so encode-time reconstructions (for error feedback) equal decoded
ones on the same device. The entropy model is Balle et al.'s factorised "entropy bottleneck"
(a monotone CDF per channel, filters 3-3-3); at the end of training it is turned into integer
frequency tables ``[GRID, 16, 256]`` (``precision_bits`` = ``PRECISION``) which the file stores.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CHUNK", "GRID", "ALPHABET", "OFFSET", "PRECISION", "LOG2_LAM0", "LOG2_LAM_STEP", "NwcNet",
           "decode_chunks", "decode_columns", "rate_index", "DECODER_KEYS"]

CHUNK = 16
GRID = 20
LOG2_LAM0 = 3.0
LOG2_LAM_STEP = 0.5
ALPHABET = 256
OFFSET = 128
PRECISION = 14
DECODER_KEYS = ("log_gain", "emb", "w1", "b1", "w2", "b2", "w3", "b3")


def rate_index(lam: float) -> float:
    """Continuous grid position of ``lam`` (0 .. GRID-1 are the trained rates)."""
    return (math.log2(lam) - LOG2_LAM0) / LOG2_LAM_STEP


def decode_chunks(state: Mapping[str, Tensor], symbols: Tensor, k: Tensor) -> Tensor:
    """Symbols [N, 16] (uint8 or int) and rate index per chunk [N] -> chunks [N, 16] float32.

    ``state``: ``log_gain`` [GRID, 16], ``emb`` [GRID, H], ``w1`` [16, H], ``b1`` [H], ``w2`` [H, H],
    ``b2`` [H], ``w3`` [H, 16], ``b3`` [16] (float32, on the device of ``symbols``).
    """
    kk = k.long()
    z = (symbols.to(torch.float32) - OFFSET) * torch.exp(-state["log_gain"])[kk]
    h = torch.addmm(state["b1"], z, state["w1"]).add_(state["emb"][kk]).relu_()
    h = torch.addmm(state["b2"], h, state["w2"]).relu_()
    return torch.addmm(state["b3"], h, state["w3"]).add_(z)


def decode_columns(state: Mapping[str, Tensor], symbols: Tensor, levels: Tensor, block: int = 500,
                   threads: int = 1) -> Tensor:
    """``decode_chunks`` for a whole tensor: symbols [cols, C, 16] uint8 and a rate index per column
    [cols] -> chunks [cols, C * 16] float32, the same values as ``decode_chunks`` (the same ops in
    the same order; tests compare them).

    Faster on a CPU (docs/NWC.md): columns are grouped by rate index, so the per-chunk gathers of
    gain and embedding rows become one broadcast vector per group, and the MLP runs over ``block``
    chunks at a time, whose [block, H] activations stay in cache. ``threads`` > 1 runs the blocks
    on that many Python threads (torch ops release the GIL). With ``block * H`` under torch's
    parallel grain (32768 elements: the default 500 at H = 64) every op runs on its calling thread,
    so no OpenMP team is started per op -- on a loaded 2-core machine those per-op thread
    hand-offs made 2 OpenMP threads 2-5x slower than 1 (measured, docs/NWC.md).
    """
    cols, c, _ = symbols.shape
    lv = levels.to(device=symbols.device, dtype=torch.int64)
    order = torch.argsort(lv, stable=True)
    counts = torch.bincount(lv, minlength=int(state["log_gain"].shape[0])).tolist()
    grouped = _rows(symbols, order)  # [cols, C, 16], columns sorted by rate index
    out = torch.empty(cols, c * CHUNK, dtype=torch.float32, device=symbols.device)
    gain = torch.exp(-state["log_gain"])
    jobs: list[tuple[int, Tensor, Tensor]] = []  # (rate index, symbols [b, 16], output [b, 16])
    start = 0
    for k, n_cols in enumerate(counts):
        if n_cols == 0:
            continue
        sym_k = grouped[start:start + n_cols].view(-1, CHUNK)
        out_k = out[start:start + n_cols].view(-1, CHUNK)
        jobs += [(k, sym_k[s:s + block], out_k[s:s + block]) for s in range(0, sym_k.shape[0], block)]
        start += n_cols

    # grad / inference mode are per thread: the workers take the caller's (the runtime decodes under
    # inference_mode, and writing into an inference tensor outside it is an error)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(part: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for k, sym_b, out_b in jobs[part::threads]:
                z = (sym_b.to(torch.float32) - OFFSET).mul_(gain[k])
                h = torch.addmm(state["b1"], z, state["w1"]).add_(state["emb"][k]).relu_()
                h = torch.addmm(state["b2"], h, state["w2"]).relu_()
                torch.addmm(state["b3"], h, state["w3"], out=out_b).add_(z)

    _run_parts(run, max(1, min(threads, len(jobs))))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(cols, device=order.device)
    return _rows(out, inverse)


def decode_weight_cpu(state: Mapping[str, Tensor], symbols: Tensor, levels: Tensor, row_scale: Tensor, rows: int,
                      block: int = 4096, threads: int = 1) -> Tensor:
    """The CPU fast path of a whole nwc weight (needs numba): symbols [cols, P] uint8 in the rANS
    decoder's order, a rate index per column [cols] and the row scales [rows] -> the weight
    [rows, cols] float32, equal to the reference (``decode_columns``, then ``w[:, :rows].t() *
    row_scale``) within float32 round-off; tests compare them.

    The weight is cut into bands of rows across all its columns (``block`` chunks or so; columns in
    slabs of ``block`` when there are more). Per band: a compiled kernel turns the symbols into
    the MLP's input (``nwc_inputs``: the latents ``(s - 128) * gain`` of each column's rate index,
    then a one-hot of that rate index among the ``U`` the tensor uses) and into the residual plus
    last bias, transposed; the MLP runs as three matmuls into buffers every band reuses (the first
    takes its bias through the one-hot -- ``w1`` extended by the rows ``b1 + emb[k]``, so columns
    of any rate index share a band -- and the last is added in place to the transposed residual);
    a compiled kernel scales the rows and copies the band into the weight along whole rows
    (``nwc_store``). No regrouping by rate index, no un-sorting, no separate transpose pass. The
    arithmetic differs from the reference only in the order of the first layer's and the last
    layer's sums (``b1 + emb[k] + z w1`` in one matmul, ``(z + b3) + h w3``): round-off.

    ``threads``: the bands are shared out over that many Python threads (the kernels and torch's
    ops release the GIL; each thread's ops run on its own OpenMP team, one thread in the runtime).
    Bands of ~4096 chunks (a 1 MB hidden activation, in L2) measured best here (docs/NWC.md).
    """
    from . import rans_numba
    from .threads import one_thread

    kern = rans_numba.kernels()
    cols, p = symbols.shape
    c = p // CHUNK
    lv = levels.to(torch.int64).cpu()
    used, slot = torch.unique(lv, return_inverse=True)
    u = used.numel()
    kk = CHUNK + u
    w1x = torch.zeros(kk, state["w1"].shape[1])
    w1x[:CHUNK] = state["w1"]
    w1x[CHUNK:CHUNK + u] = state["b1"] + state["emb"][used]
    gain = torch.exp(-state["log_gain"])[used].contiguous()
    sym = symbols.contiguous().numpy()
    scale = row_scale.to(torch.float32).contiguous().numpy()
    slot_np, gain_np = slot.contiguous().numpy(), gain.numpy()
    nb = min(cols, block)  # columns per block: all of them (stores run along whole rows of the weight)
    m = min(c, max(1, block // nb))  # chunks of each column per block, balanced over the column
    m = -(-c // -(-c // m))
    jobs = [(c0, min(cols, c0 + nb), r0 * CHUNK, min(c, r0 + m) * CHUNK)
            for c0 in range(0, cols, nb) for r0 in range(0, c, m)]
    out = torch.empty(rows, cols, dtype=torch.float32)
    out_np = out.numpy()
    h = state["w1"].shape[1]
    w3t = state["w3"].t()
    b3 = state["b3"].contiguous().numpy()
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(part: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), one_thread():
            cap = nb * m
            x, h1, h2, acc = torch.empty(cap, kk), torch.empty(cap, h), torch.empty(cap, h), torch.empty(CHUNK * cap)
            views: dict[int, tuple] = {}  # per block size: the buffers' views (most blocks share one size)
            for c0, c1, r0, r1 in jobs[part::threads]:
                b = (c1 - c0) * (r1 - r0) // CHUNK
                if b not in views:
                    xb, accb = x[:b], acc[:CHUNK * b].view(CHUNK, b)
                    views[b] = (xb, h1[:b], h2[:b], accb, xb.numpy(), accb.numpy())
                xb, h1b, h2b, accb, x_np, acc_np = views[b]
                kern.nwc_inputs(sym, slot_np, gain_np, b3, c0, c1, r0, r1, x_np, acc_np)
                torch.mm(xb, w1x, out=h1b).relu_()
                torch.addmm(state["b2"], h1b, state["w2"], out=h2b).relu_()
                accb.addmm_(w3t, h2b.t())  # z + b3 + (h2 @ w3), transposed
                kern.nwc_store(acc_np, c0, c1, r0, r1, scale, out_np)

    _run_parts(run, max(1, min(threads, len(jobs))))
    return out


def _run_parts(run: Callable[[int], None], threads: int) -> None:
    """``run(0) .. run(threads - 1)``, each part on its own thread when there are several."""
    if threads == 1:
        run(0)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="thawed-nwc-mlp") as pool:
        for f in [pool.submit(run, i) for i in range(threads)]:
            f.result()


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(0, index)``; on a CPU through numpy (one thread): a torch copy this size
    starts an OpenMP team, whose idle workers then spin on the cores the decoder's threads need."""
    if t.device.type != "cpu":
        return t.index_select(0, index)
    return torch.from_numpy(t.numpy()[index.numpy()])


class _Mlp(nn.Module):
    def __init__(self, hidden: int, grid: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(grid, hidden))
        self.l1 = nn.Linear(CHUNK, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, CHUNK)
        nn.init.zeros_(self.l3.weight)  # start as the identity: a plain entropy-coded scalar quantiser
        nn.init.zeros_(self.l3.bias)

    def forward(self, x: Tensor, k: Tensor) -> Tensor:
        h = F.relu(self.l1(x) + self.emb[k])
        return x + self.l3(F.relu(self.l2(h)))


class _EntropyBottleneck(nn.Module):
    """Factorised prior: one learned monotone CDF per (rate index, latent channel)."""

    def __init__(self, init_scale: Tensor, filters: tuple[int, ...] = (3, 3, 3)) -> None:
        """``init_scale`` [channels]: the initial width of each channel's density (in symbol units)."""
        super().__init__()
        channels = init_scale.numel()
        dims = (1, *filters, 1)
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            scale = init_scale.float().clamp_min(1.0) ** (1 / (len(filters) + 1))
            init = torch.log(torch.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(init.view(-1, 1, 1).repeat(1, dims[i + 1], dims[i])))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, v: Tensor, ch: Tensor) -> Tensor:
        """v: [C', N] values for channels ``ch`` [C'] -> CDF logits [C', N]."""
        v = v.unsqueeze(1)  # [C', 1, N]
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            v = torch.bmm(F.softplus(m[ch]), v) + b[ch]
            if i < len(self.factors):
                v = v + torch.tanh(self.factors[i][ch]) * torch.tanh(v)
        return v.squeeze(1)

    def likelihood(self, y: Tensor, ch: Tensor) -> Tensor:
        """Probability of the unit bin around ``y`` ([C', N]) under channels ``ch``."""
        lo = self.logits_cdf(y - 0.5, ch)
        hi = self.logits_cdf(y + 0.5, ch)
        s = -torch.sign(lo + hi).detach()
        return (torch.sigmoid(s * hi) - torch.sigmoid(s * lo)).abs()


class NwcNet(nn.Module):
    """Encoder, decoder and entropy model; ``enc_hidden`` only matters offline, ``dec_hidden`` is
    the per-weight decode cost (``(16*H + H*H + 16*H) / 16`` multiply-adds per weight)."""

    def __init__(self, enc_hidden: int = 128, dec_hidden: int = 64, grid: int = GRID) -> None:
        super().__init__()
        self.grid = grid
        self.enc_hidden, self.dec_hidden = enc_hidden, dec_hidden
        lam = 2.0 ** (LOG2_LAM0 + LOG2_LAM_STEP * torch.arange(grid, dtype=torch.float32))
        # High-rate optimum of an entropy-coded uniform quantiser for D + R/lambda: step sqrt(6/(lambda ln 2)).
        self.log_gain = nn.Parameter(0.5 * torch.log(lam * math.log(2) / 6).unsqueeze(1).repeat(1, CHUNK))
        self.enc = _Mlp(enc_hidden, grid)
        self.dec = _Mlp(dec_hidden, grid)
        self.prior = _EntropyBottleneck(4 * self.log_gain.detach().exp().reshape(-1))

    def encode_latent(self, x: Tensor, k: Tensor) -> Tensor:
        """Chunks [N, 16], rate index [N] -> unrounded latents [N, 16] (symbol units minus OFFSET)."""
        return self.enc(x, k) * torch.exp(self.log_gain[k])

    def quantize(self, y: Tensor) -> Tensor:
        """Latents -> symbols [N, 16] int64 in [0, ALPHABET)."""
        return (torch.round(y) + OFFSET).clamp_(0, ALPHABET - 1).long()

    def decoder_state(self) -> dict[str, Tensor]:
        d = self.dec
        return {"log_gain": self.log_gain.detach().float().contiguous(), "emb": d.emb.detach().contiguous(),
                "w1": d.l1.weight.detach().t().contiguous(), "b1": d.l1.bias.detach().contiguous(),
                "w2": d.l2.weight.detach().t().contiguous(), "b2": d.l2.bias.detach().contiguous(),
                "w3": d.l3.weight.detach().t().contiguous(), "b3": d.l3.bias.detach().contiguous()}

    def bits(self, y: Tensor, k: int) -> Tensor:
        """Bits of each latent under rate index ``k``'s prior: y [N, 16] -> [N, 16]."""
        ch = torch.arange(CHUNK, device=y.device) + k * CHUNK
        p = self.prior.likelihood(y.t(), ch).t()
        return -torch.log2(p.clamp_min(1e-9))

    @torch.no_grad()
    def histogram_tables(self, chunks: Tensor, precision_bits: int = PRECISION, batch: int = 1 << 16) -> Tensor:
        """Integer tables [GRID, 16, ALPHABET] fitted to the symbols of ``chunks`` at every rate index
        (the maximum-likelihood discrete factorised prior, add-1/2 smoothed so every symbol codes)."""
        from .rans import quantize_frequencies

        counts = torch.full((self.grid, CHUNK, ALPHABET), 0.5, dtype=torch.float64)
        for k in range(self.grid):
            for s in range(0, len(chunks), batch):
                x = chunks[s:s + batch]
                sym = self.quantize(self.encode_latent(x, torch.full((len(x),), k, dtype=torch.long)))
                idx = torch.arange(CHUNK) * ALPHABET + sym
                counts[k] += torch.bincount(idx.reshape(-1), minlength=CHUNK * ALPHABET).view(CHUNK, ALPHABET)
        rows = [quantize_frequencies(r, precision_bits) for r in counts.view(-1, ALPHABET)]
        return torch.stack(rows).view(self.grid, CHUNK, ALPHABET).to(torch.int32)

    @torch.no_grad()
    def tables(self, precision_bits: int = PRECISION) -> Tensor:
        """Integer frequency tables [GRID, 16, ALPHABET] (every entry >= 1, rows sum to 2**precision_bits);
        the mass beyond the alphabet goes to its end symbols, where clamped latents land."""
        from .rans import quantize_frequencies

        sym = torch.arange(ALPHABET, dtype=torch.float32) - OFFSET
        ch = torch.arange(self.grid * CHUNK)
        lo = torch.sigmoid(self.prior.logits_cdf((sym - 0.5).expand(len(ch), -1).contiguous(), ch)).double()
        hi = torch.sigmoid(self.prior.logits_cdf((sym + 0.5).expand(len(ch), -1).contiguous(), ch)).double()
        p = (hi - lo).clamp_min(0)
        p[:, 0] += lo[:, 0]
        p[:, -1] += 1 - hi[:, -1]
        p = p / p.sum(1, keepdim=True)
        rows = [quantize_frequencies(r + 1e-12, precision_bits) for r in p]
        return torch.stack(rows).view(self.grid, CHUNK, ALPHABET).to(torch.int32)
