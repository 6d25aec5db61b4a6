"""``nwc``: Neural Weight Compression (arXiv 2510.11234) -- a learned autoencoder codec for weights
with entropy-coded latents.

A weight ``W`` [rows, cols] (``rows`` = output dim) is normalised by its per-row RMS ``s`` (stored
F16), each input column is cut into chunks of 16 consecutive rows (rows zero-padded to a multiple
of 16), and every chunk goes through the trained network (``nwc_net``): encoder MLP -> 16 latents
-> rounding -> symbols, coded with interleaved rANS (``rans``, one table per symbol) under the learned factorised
prior's integer tables. Each input column ``j`` has a rate index ``levels[j]`` on the network's
lambda grid (``lambda_k = 2**(3 + k/2)``): the base rate from ``lam`` / ``target_bpw`` (with
``alloc=global``, the default, chosen for the whole checkpoint by ``runtime/compress/nwc_plan.py``
and handed in as ``ctx.extras["nwc_rate"]``; ``alloc=tensor`` bisects each tensor alone), raised for
the most important columns by calibration importance (top 0.1 % / 1 % / 10 %: +6 / +4 / +2 grid
steps, i.e. +1.5 / +1 / +0.5 bit).

Fields (``P`` = rows padded to a multiple of 16, ``n = cols * P`` symbols)::

    row_scale:  [rows] float16      # per-row RMS
    levels:     [cols] uint8        # rate index of each input column (< grid)
    states:     [lanes] int32       # rANS lane states (uint32 bit pattern)
    lane_words: [lanes] int32
    words:      [n_words] int16     # rANS words, lane-major

Symbol ``i`` is latent channel ``i % 16`` of chunk ``i // 16``; chunk ``c`` covers rows
``16 * (c % (P/16)) ..`` of column ``c // (P/16)``; its table is ``levels[col] * 16 + channel``.
Params: ``{"rows", "cols", "lanes", "n_words", "precision_bits", "grid", "dec_hidden"}``.

Shared state (once per file, ``__codec__.nwc.<id>.<param>``): the decoder network ``dec.log_gain``
[grid, 16], ``dec.emb`` [grid, H], ``dec.w1`` [16, H], ``dec.b1`` [H], ``dec.w2`` [H, H],
``dec.b2`` [H], ``dec.w3`` [H, 16], ``dec.b3`` [16] (float32) and, for every rate index ``k`` the
file uses, its entropy tables ``kNN.freq`` [16, 256] int16 (rows sum to ``2**precision_bits``).

Decode: rANS over all lanes at once (on CUDA with Triton: the lane decoder ``kernels.rans`` on the
device, then the MLP as batched matmuls, ``kernels.nwc``; otherwise ``rans.decode``: compiled on
the CPU when numba imports, else the torch reference on the payload's device), then the decoder
MLP. On a CPU with numba: ``nwc_net.decode_weight_cpu`` (bands of rows, compiled kernels around
three matmuls, each band stored straight into the weight with its row scales; on
``torch.get_num_threads()`` Python threads, each running its torch ops on one thread). Otherwise
(the reference, ``rans_backend="torch"``, other devices): ``nwc_net.decode_columns`` over columns
grouped by rate index in blocks of ``DECODE_BLOCK_*`` chunks, then the transpose and the row
scales. The two agree to float32 round-off (tests/test_codec_nwc_cpu.py). Decoding is integer-exact up to
the MLP, so devices agree to float tolerance.

Error compensation (``ec=True``, the default since stop 17; it uses the layer's input Gram matrix
from calibration in ``ctx.extras["input_gram"]`` and encodes without feedback where there is none,
e.g. the embedding): the shared GPTQ stage (``codecs/gptq.py``: dampening ``damp``, lazy block
updates, ``act_order``) with the network as its per-column quantiser, each column's error pushed
onto the not-yet-encoded columns through the Cholesky factor of the inverse Hessian. Quality floor
and speed: docs/NWC.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from . import rans, rans_numba
from .threads import one_thread
from .base import (Codec, EncodeContext, Encoded, FieldSpec, SharedState, TensorSpec, check_known_params, check_param,
                   stored_at_unit, train_dtype)
from .errors import CodecError, CorruptPayloadError
from .kernels import kernels_available
from .nwc_net import (ALPHABET, CHUNK, DECODER_KEYS, decode_chunks, decode_columns, decode_weight_cpu,
                      rate_index)

__all__ = ["Nwc", "load_network", "NetworkFile", "column_levels", "RateProfile"]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "nwc_weights"
# chunks per decoder MLP call: on a CPU small blocks on the decoder's own threads (nwc_net.decode_columns:
# the activations stay in cache and no op starts an OpenMP team); a GPU wants big launches
DECODE_BLOCK_CPU, DECODE_BLOCK_GPU = 500, 1 << 17
# the compiled CPU path (nwc_net.decode_weight_cpu): 4096 chunks (a 1 MB hidden activation, in L2),
# fewer Python iterations and matmuls large enough to run near the core's peak (docs/NWC.md)
FAST_BLOCK_CPU = 4096
LEVEL_BONUS = ((0.001, 6), (0.01, 4), (0.1, 2))  # (top fraction of columns by importance, extra grid steps)
DEFAULT_LAM = 256.0
ALLOC_MODES = ("global", "tensor")  # target_bpw: one slope across the checkpoint, or every tensor at the target
SENS_MODES = ("fisher", "kl")  # how alloc=global weighs a tensor's error (runtime/compress/nwc_plan.py)
SAMPLE_COLS = 64  # columns on which rates and errors are measured at every rate index
_MAX_DIM = 1 << 24


class NetworkFile:
    """A trained network file: encoder (offline), decoder state and tables (stored in checkpoints)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        from .nwc_net import NwcNet

        if not path.is_file():
            raise CodecError(f"nwc network file {path} does not exist; train one with `thawed train-codec nwc --out FILE`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "thawed-nwc-network":
            raise CodecError(f"{path} is not an nwc network file (metadata 'format' is {meta.get('format')!r})")
        self.path = path
        self.grid = int(meta["grid"])
        self.precision_bits = int(meta["precision_bits"])
        self.dec_hidden = int(meta["dec_hidden"])
        self.record = meta.get("record", "{}")
        net = NwcNet(int(meta["enc_hidden"]), self.dec_hidden, self.grid)
        net.enc.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("enc.")})
        with torch.no_grad():
            net.log_gain.copy_(t["dec.log_gain"])
        net.eval()
        self.net = net
        self.decoder = {k: t[f"dec.{k}"].float().contiguous() for k in DECODER_KEYS}
        self.tables = t["tables"].to(torch.int32)  # [grid, 16, 256]
        rans.check_tables(self.tables.view(-1, ALPHABET), self.precision_bits, what=f"nwc network {path}")


@lru_cache(maxsize=4)
def load_network(name: str) -> NetworkFile:
    """``default`` (shipped in the package) or a path to a network file."""
    path = WEIGHTS_DIR / f"{name}.safetensors" if "/" not in name and not name.endswith(".safetensors") else Path(name)
    return NetworkFile(path)


def column_levels(r: float, cols: int, importance: Tensor | None, grid: int, levels: bool = True) -> Tensor:
    """Rate index per column [cols] int64: ``floor(r)``, the most important ``frac(r)`` of columns one
    step more, then the importance bonuses (``LEVEL_BONUS``); clamped to the grid."""
    r = min(max(r, 0.0), grid - 1.0)
    base = math.floor(r)
    order = torch.arange(cols) if importance is None else torch.argsort(importance.float(), descending=True, stable=True)
    out = torch.full((cols,), base, dtype=torch.int64)
    out[order[: round((r - base) * cols)]] += 1
    if levels and importance is not None:
        bonus = torch.zeros(cols, dtype=torch.int64)
        for frac, extra in reversed(LEVEL_BONUS):
            bonus[order[: max(1, round(frac * cols)) if frac * cols >= 0.5 else 0]] = extra
        out += bonus
    return out.clamp_(0, grid - 1)


@dataclass(frozen=True)
class RateProfile:
    """One tensor's measured rate and error at every rate index (``Nwc.rate_profile``)."""

    rows: int
    cols: int
    bits_per_col: Tensor  # [grid] float64: coded bits of one column at each rate index (sampled mean)
    mse: Tensor  # [grid] float64: mean squared error per weight of the row-normalised weights
    row_scale: Tensor  # [rows] float32: the stored (F16) row scales
    side_bits: float  # row scales, levels, rANS lane heads


def _saturated(sym: Tensor) -> Tensor:
    """Columns [c] of symbols [c, P] that touch either end of the symbol range (clipped latents)."""
    return ((sym == 0) | (sym == ALPHABET - 1)).any(1)


class Nwc(Codec, name="nwc", version=1):
    """Learned transform + entropy-coded latents; the decoder network and tables live in the file."""

    roles = ("linear", "embedding", "lm_head")

    def __init__(self, lam: float | None = None, target_bpw: float | None = None, ec: bool = True,
                 levels: bool = True, network: str = "default", steps: int = 2048, damp: float = 0.01,
                 act_order: bool = True, alloc: str = "global", spread: float | None = None,
                 sens: str = "fisher") -> None:
        if lam is not None and target_bpw is not None:
            raise CodecError("codec 'nwc': give either 'lam' or 'target_bpw', not both")
        if lam is not None and not lam > 0:
            raise CodecError(f"codec 'nwc' option 'lam' must be > 0, got {lam!r}")
        if target_bpw is not None and not 1.0 <= target_bpw <= 8.0:
            raise CodecError(f"codec 'nwc' option 'target_bpw' must be in [1, 8], got {target_bpw!r}")
        if not 1 <= steps <= 1 << 20:
            raise CodecError(f"codec 'nwc' option 'steps' must be in [1, 2**20], got {steps!r}")
        if alloc not in ALLOC_MODES:
            raise CodecError(f"codec 'nwc' option 'alloc' must be one of {', '.join(ALLOC_MODES)}, got {alloc!r} "
                             "('global': one rate-distortion slope across the checkpoint; 'tensor': every tensor "
                             "at target_bpw)")
        self.lam, self.target_bpw, self.ec, self.levels = lam, target_bpw, ec, levels
        self.network, self.steps, self.damp, self.act_order = network, steps, damp, act_order
        if spread is not None and not 0 < spread <= 8:
            raise CodecError(f"codec 'nwc' option 'spread' must be in (0, 8] bits per weight, got {spread!r}")
        if sens not in SENS_MODES:
            raise CodecError(f"codec 'nwc' option 'sens' must be one of {', '.join(SENS_MODES)}, got {sens!r} "
                             "('fisher': squared calibration gradients; 'kl': measured KL of each tensor's noise)")
        self.alloc, self.spread, self.sens = alloc, spread, sens
        self._net = load_network(network)
        self._used: set[int] = set()

    @property
    def plans_globally(self) -> bool:
        """True when the compression pipeline should choose every tensor's rate
        (``runtime/compress/nwc_plan.py``) rather than this encoder bisecting each tensor alone."""
        return self.target_bpw is not None and self.alloc == "global"

    @property
    def grid(self) -> int:
        """Number of rate indices of the network's lambda grid."""
        return self._net.grid

    @property
    def needs_input_grams(self) -> bool:
        """The compression pipeline calibrates layer inputs (``runtime/compress/input_stats.py``) when True."""
        return self.ec or self.levels

    # ---- encoding -----------------------------------------------------------------------------
    def _quant(self, wn: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Row-normalised columns [c, P] and their rate indices [c] -> symbols [c, P] uint8, reconstruction [c, P]."""
        c, p = wn.shape
        kk = k.repeat_interleave(p // CHUNK)
        x = wn.reshape(-1, CHUNK)
        with torch.no_grad():
            sym = self._net.net.quantize(self._net.net.encode_latent(x, kk))
            rec = decode_chunks(self._net.decoder, sym, kk)
        return sym.to(torch.uint8).view(c, p), rec.view(c, p)

    def _normalise(self, weight: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """Checked weight -> (row scales [rows] f16, row-normalised columns [cols, P] f32, rows zero-padded)."""
        if weight.dim() != 2:
            raise CodecError(f"tensor {name!r}: nwc encodes 2-D weights, got {list(weight.shape)}; "
                             "store it with 'raw' or 'rtn'")
        rows, cols = weight.shape
        if not (0 < rows <= _MAX_DIM and 0 < cols <= _MAX_DIM):
            raise CodecError(f"tensor {name!r}: nwc needs 1..{_MAX_DIM} rows and columns, got {rows}x{cols}")
        w = weight.detach().to("cpu", torch.float32)
        if not torch.isfinite(w).all():
            raise CodecError(f"tensor {name!r} has NaN/Inf values; nwc cannot store them, use 'lossless' or 'raw'")
        scale16 = w.square().mean(1).sqrt().clamp(6.2e-5, 6.0e4).to(torch.float16)
        p = -(-rows // CHUNK) * CHUNK
        wn_t = torch.zeros(cols, p)
        wn_t[:, :rows] = (w / scale16.float()[:, None]).t()
        return scale16, wn_t

    def _measure(self, wn_t: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """Coded bits per column [grid] and mean squared error per weight of the row-normalised
        weights [grid], at every rate index, on up to ``SAMPLE_COLS`` evenly spaced columns; a
        column whose latents saturate at an index counts as the encoder stores it (``_unsaturate``:
        at the highest index below that does not)."""
        cols, p = wn_t.shape
        g = self._net.grid
        idx = torch.linspace(0, cols - 1, min(cols, SAMPLE_COLS)).round().long()
        sample = wn_t[idx]
        flat = self._net.tables.view(-1, ALPHABET)
        per_k = torch.empty(g, dtype=torch.float64)
        mse = torch.empty(g, dtype=torch.float64)
        good_bits = torch.zeros(len(idx), dtype=torch.float64)
        good_err = torch.zeros(len(idx), dtype=torch.float64)
        for k in range(g):
            kk = torch.full((len(idx),), k)
            sym, rec = self._quant(sample, kk)
            tid = (kk[:, None, None] * CHUNK + torch.arange(CHUNK)).expand(len(idx), p // CHUNK, CHUNK)
            bits = rans.code_lengths(sym.reshape(-1), tid.reshape(-1), flat, self._net.precision_bits)
            bits = bits.reshape(len(idx), -1).double().sum(1)
            err = (rec[:, :rows] - sample[:, :rows]).double().square().mean(1)
            ok = ~((sym == 0) | (sym == ALPHABET - 1)).any(1) | (k == 0)
            good_bits = torch.where(ok, bits, good_bits)
            good_err = torch.where(ok, err, good_err)
            per_k[k] = good_bits.mean()
            mse[k] = good_err.mean()
        return per_k, mse

    def _side_bits(self, rows: int, cols: int) -> float:
        """Row scales, levels and the rANS lane heads (estimated lanes) in bits."""
        p = -(-rows // CHUNK) * CHUNK
        return rows * 16 + cols * 8 + max(1, -(-(cols * p) // self.steps)) * 64

    def rate_profile(self, weight: Tensor, spec: TensorSpec) -> "RateProfile":
        """What a planner needs to trade this tensor's bits against its error: bits per column and
        normalised error per weight at every rate index (measured on sampled columns, as
        ``target_bpw`` measures them), the row scales and the side bits. Offline only."""
        scale16, wn_t = self._normalise(weight, spec.name)
        rows, cols = weight.shape
        per_k, mse = self._measure(wn_t, rows)
        return RateProfile(rows, cols, per_k, mse, scale16.float(), self._side_bits(rows, cols))

    def levels_at(self, r: float, cols: int, importance: Tensor | None) -> Tensor:
        """The per-column rate indices [cols] int64 that grid position ``r`` gives (``encode``'s)."""
        return column_levels(r, cols, importance, self._net.grid, self.levels)

    def _rate_for(self, wn_t: Tensor, importance: Tensor | None, rows: int, target: float) -> float:
        """Grid position whose estimated bpw (side info included) hits ``target``: bits per column
        at every rate index measured on up to 64 sampled columns, then bisection on the position."""
        cols, p = wn_t.shape
        g = self._net.grid
        per_k, _ = self._measure(wn_t, rows)
        side = self._side_bits(rows, cols)

        def bpw(r: float) -> float:
            lv = column_levels(r, cols, importance, g, self.levels)
            return (float(per_k[lv].sum()) + side) / (rows * cols)

        lo, hi = 0.0, g - 1.0
        if bpw(hi) <= target:
            return hi
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if bpw(mid) < target else (lo, mid)
        return lo

    def encode(self, weight: Tensor, spec: TensorSpec, ctx: EncodeContext) -> Encoded:
        if tuple(weight.shape) != tuple(spec.shape):
            raise CodecError(f"tensor {spec.name!r}: nwc encodes 2-D weights matching the spec, got "
                             f"{list(weight.shape)} (spec {list(spec.shape)}); store it with 'raw' or 'rtn'")
        scale16, wn_t = self._normalise(weight, spec.name)
        rows, cols = weight.shape
        w = weight.detach().to("cpu", torch.float32)
        scale = scale16.float()
        p = wn_t.shape[1]
        imp = ctx.importance.detach().to("cpu", torch.float32).reshape(-1) if ctx.importance is not None else None
        if imp is not None and imp.numel() != cols:
            raise CodecError(f"tensor {spec.name!r}: importance has {imp.numel()} entries for {cols} input columns")
        planned = ctx.extras.get("nwc_rate")
        if planned is not None:  # the whole-checkpoint plan (runtime/compress/nwc_plan.py) chose it
            r = float(planned)
            if not 0.0 <= r <= self._net.grid - 1:
                raise CodecError(f"tensor {spec.name!r}: planned nwc rate {r} is outside the grid [0, {self._net.grid - 1}]")
        elif self.target_bpw is not None:
            if self.alloc == "global":
                log.debug("tensor %s: no whole-checkpoint nwc plan (encoded outside the compression pipeline); "
                          "its rate is bisected to target_bpw on its own", spec.name)
            r = self._rate_for(wn_t, imp, rows, self.target_bpw)
        else:
            r = rate_index(self.lam if self.lam is not None else DEFAULT_LAM)
        lv = column_levels(r, cols, imp, self._net.grid, self.levels)
        gram = ctx.extras.get("input_gram") if self.ec else None
        if gram is not None:
            lv, sym = self._encode_ec(w, scale, lv, gram.to(torch.float32), spec.name)
        else:
            sym, _ = self._quant(wn_t, lv)
            lv, sym = self._unsaturate(wn_t, lv, sym, spec.name)
        tid = (lv[:, None, None] * CHUNK + torch.arange(CHUNK)).expand(cols, p // CHUNK, CHUNK).reshape(-1)
        stream = rans.encode(sym.reshape(-1), self._net.tables.view(-1, ALPHABET), self._net.precision_bits,
                             table_of=tid, steps=self.steps)
        self._used.update(int(k) for k in torch.unique(lv))
        fields = {"row_scale": scale16.contiguous(), "levels": lv.to(torch.uint8), "states": stream.states,
                  "lane_words": stream.lane_words, "words": stream.words}
        params = {"rows": rows, "cols": cols, "lanes": stream.lanes, "n_words": int(stream.words.numel()),
                  "precision_bits": self._net.precision_bits, "grid": self._net.grid, "dec_hidden": self._net.dec_hidden,
                  "rate": round(r, 4)}
        return Encoded(fields, params)

    def _unsaturate(self, wn_t: Tensor, lv: Tensor, sym: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """Columns whose latents hit the ends of the symbol range at their rate index (outlier
        weights, |w| ~ 10x the row RMS, times a high index's gain) are clipped, and the error grows
        20-100x instead of shrinking: such a column's index is lowered until nothing saturates
        (SmolLM2's down_proj outlier columns at the top indices; found by the global allocation)."""
        bad = _saturated(sym) & (lv > 0)
        if not bool(bad.any()):
            return lv, sym
        lv, sym = lv.clone(), sym.clone()
        lowered = 0
        while bool(bad.any()):
            idx = torch.nonzero(bad).flatten()
            lv[idx] -= 1
            s, _ = self._quant(wn_t[idx], lv[idx])
            sym[idx] = s
            bad[idx] = _saturated(s) & (lv[idx] > 0)
            lowered += len(idx)
        log.debug("tensor %s: %d column rate steps lowered to avoid saturated latents", name, lowered)
        return lv, sym

    def _encode_ec(self, w: Tensor, scale: Tensor, lv: Tensor, gram: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """GPTQ error feedback through the shared stage (``codecs/gptq.py``) -> (rate indices [cols],
        symbols [cols, P] uint8). A column whose latents saturate at its rate index (see
        ``_unsaturate``; the feedback moves weights too, so this is checked on the updated column,
        when GPTQ quantises it) is quantised again one index lower until none does."""
        from .gptq import GptqConfig, gptq

        rows, cols = w.shape
        if tuple(gram.shape) != (cols, cols):
            raise CodecError(f"tensor {name!r}: input Gram matrix is {list(gram.shape)}, expected [{cols}, {cols}]")
        p = -(-rows // CHUNK) * CHUNK
        sym = torch.empty(cols, p, dtype=torch.uint8)
        col = torch.zeros(1, p)
        inv_scale = 1.0 / scale
        lv = lv.clone()
        lowered = 0

        def column(j: int, x: Tensor) -> Tensor:
            nonlocal lowered
            col[0, :rows] = x * inv_scale
            s, rec = self._quant(col, lv[j:j + 1])
            while int(lv[j]) > 0 and bool(_saturated(s)[0]):
                lv[j] -= 1
                lowered += 1
                s, rec = self._quant(col, lv[j:j + 1])
            sym[j] = s[0]
            return rec[0, :rows] * scale

        gptq(w, gram, column, GptqConfig(damp=self.damp, act_order=self.act_order), name=name)
        if lowered:
            log.debug("tensor %s: %d column rate steps lowered to avoid saturated latents (error feedback)",
                      name, lowered)
        return lv, sym

    def shared_tensors(self) -> dict[str, Tensor]:
        if not self._used:
            return {}
        out = {f"dec.{k}": v.contiguous() for k, v in self._net.decoder.items()}
        for k in sorted(self._used):
            out[f"k{k:02d}.freq"] = self._net.tables[k].to(torch.int16).contiguous()
        return out

    # ---- decoding -----------------------------------------------------------------------------
    @classmethod
    def expected_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> dict[str, FieldSpec]:
        check_known_params(cls.name, spec.name, params, ("rows", "cols", "lanes", "n_words", "precision_bits", "grid",
                                                          "dec_hidden", "rate"))
        if len(spec.shape) != 2:
            raise CodecError(f"tensor {spec.name!r}: codec 'nwc' stores 2-D tensors, the index says {list(spec.shape)}")
        rows = check_param(cls.name, spec.name, params, "rows", int, 1, _MAX_DIM)
        cols = check_param(cls.name, spec.name, params, "cols", int, 1, _MAX_DIM)
        if (rows, cols) != tuple(spec.shape):
            raise CodecError(f"tensor {spec.name!r}: codec 'nwc' params say {rows}x{cols}, the tensor is "
                             f"{list(spec.shape)}; the index is damaged")
        n = cols * (-(-rows // CHUNK) * CHUNK)
        lanes = check_param(cls.name, spec.name, params, "lanes", int, 1, n)
        n_words = check_param(cls.name, spec.name, params, "n_words", int, 0, n)
        check_param(cls.name, spec.name, params, "precision_bits", int, 8, 15)
        check_param(cls.name, spec.name, params, "grid", int, 1, 256)
        check_param(cls.name, spec.name, params, "dec_hidden", int, 1, 4096)
        if "rate" in params:  # informational (the planned rate), but still checked
            check_param(cls.name, spec.name, params, "rate", float, 0, 64)
        return {"row_scale": FieldSpec(torch.float16, (rows,)), "levels": FieldSpec(torch.uint8, (cols,)),
                "states": FieldSpec(torch.int32, (lanes,)), "lane_words": FieldSpec(torch.int32, (lanes,)),
                "words": FieldSpec(torch.int16, (n_words,))}

    @classmethod
    def _shared(cls, spec: TensorSpec, shared: SharedState, params: Mapping[str, Any], used: list[int],
                device: torch.device, table_device: torch.device | None = None) -> tuple[dict[str, Tensor], Tensor]:
        table_device = device if table_device is None else table_device
        grid, h, k_bits = params["grid"], params["dec_hidden"], params["precision_bits"]
        shapes = {"log_gain": (grid, CHUNK), "emb": (grid, h), "w1": (CHUNK, h), "b1": (h,), "w2": (h, h),
                  "b2": (h,), "w3": (h, CHUNK), "b3": (CHUNK,)}
        dec = {}
        for key, shape in shapes.items():
            t = shared.get(f"dec.{key}")
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != shape:
                got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                raise CorruptPayloadError(f"tensor {spec.name!r}: nwc shared state 'dec.{key}' is {got}, expected "
                                          f"float32 {list(shape)}; the file's __codec__.nwc state is damaged or incomplete")
            dec[key] = t.to(device)
        tables = torch.ones(grid, CHUNK, ALPHABET, dtype=torch.int32, device=table_device)
        for k in used:
            t = shared.get(f"k{k:02d}.freq")
            if t is None or tuple(t.shape) != (CHUNK, ALPHABET) or t.dtype != torch.int16:
                raise CorruptPayloadError(f"tensor {spec.name!r}: nwc uses rate index {k} but shared table "
                                          f"'k{k:02d}.freq' is missing or malformed; the file is damaged")
            tables[k] = t.to(device=table_device, dtype=torch.int32)
        rans.check_tables(tables[used].view(-1, ALPHABET), k_bits,
                              what=f"tensor {spec.name!r}: nwc shared tables")
        return dec, tables.view(-1, ALPHABET)

    @classmethod
    def levels_used(cls, f: dict[str, Tensor], spec: TensorSpec, params: Mapping[str, Any]) -> tuple[Tensor, list[int]]:
        """The per-column rate levels (int64) and the sorted distinct ones, checked against the grid
        (one small host sync: the distinct levels pick the tables). Shared with the GPU kernel."""
        lv = f["levels"].long()
        used = torch.unique(lv).tolist()
        if used[-1] >= params["grid"]:
            raise CorruptPayloadError(f"tensor {spec.name!r}: nwc field 'levels' holds rate index {used[-1]} but the "
                                      f"grid has {params['grid']}; the payload is damaged")
        return lv, used

    @classmethod
    def decode(cls, enc: Encoded, spec: TensorSpec, shared: SharedState,
               device: torch.device, dtype: torch.dtype, entropy_on_cpu: bool | None = None,
               rans_backend: str = "auto", fast: bool | None = None) -> Tensor:
        """``fast`` (default: on CUDA when the Triton kernels are available and neither
        ``entropy_on_cpu`` nor ``rans_backend`` asks otherwise): the rANS lanes in the Triton lane
        decoder on the device and the MLP as batched matmuls (``kernels.nwc``; same symbols, values
        to float round-off); ``False`` keeps the path below, the reference.

        ``entropy_on_cpu`` (default: when decoding on a GPU without the kernel): run the rANS lanes on the host and
        only the decoder MLP on the device. rANS is a loop of small sequential steps, which a GPU
        runs slower than a CPU (H200 vs 16 host threads, torch reference on both: 6.0 s vs 2.4 s for
        10.6 M weights); the symbols are identical either way (integer arithmetic), so only the
        speed changes. ``rans_backend``: ``rans.decode``'s (``auto``: compiled on the CPU when numba
        imports; ``torch``: the pure-PyTorch reference)."""
        dev = torch.device(device)
        if fast is None:
            fast = dev.type == "cuda" and not entropy_on_cpu and rans_backend == "auto" and kernels_available(dev)
        if fast:
            from .kernels import nwc as knwc

            return knwc.decode(enc.to(dev), spec, dtype, shared=shared)
        # the compiled CPU path brings its own threads (rANS lanes and MLP bands, ``threads`` of each) and
        # runs every torch op on one (``one_thread``): an op big enough for an OpenMP team of the
        # caller's size (the tables below, a dtype cast) pays a barrier, which on a busy machine waits for
        # a descheduled thread (measured: 7 ms for one 327 KB ``torch.ones`` with torch.set_num_threads(2))
        compiled = dev.type == "cpu" and rans_backend != "torch" and rans_numba.available()
        threads = torch.get_num_threads()
        with one_thread() if compiled else contextlib.nullcontext():
            f = cls.checked_fields(enc, spec, dev)
            if entropy_on_cpu is None:
                entropy_on_cpu = dev.type != "cpu"
            ent = torch.device("cpu") if entropy_on_cpu else dev
            prm = enc.params
            rows, cols = prm["rows"], prm["cols"]
            p = -(-rows // CHUNK) * CHUNK
            lv, used = cls.levels_used(f, spec, prm)
            dec, tables = cls._shared(spec, shared, prm, used, dev, ent)
            # table of every symbol: level of its column * 16 + latent channel (< grid * 16 <= 4096: int16)
            if ent.type == "cpu":  # numpy: one thread, no OpenMP team for this n-element copy
                lv_np = f["levels"].cpu().numpy().astype(np.int16)
                ids = lv_np[:, None, None] * CHUNK + np.arange(CHUNK, dtype=np.int16)
                tid = torch.from_numpy(np.broadcast_to(ids, (cols, p // CHUNK, CHUNK)).copy().reshape(-1))
            else:
                lv_e = f["levels"].to(ent, torch.int16)
                tid = (lv_e[:, None, None] * CHUNK + torch.arange(CHUNK, device=ent, dtype=torch.int16))
                tid = tid.expand(cols, p // CHUNK, CHUNK).reshape(-1)
        sym = rans.decode(f["states"].to(ent), f["words"].to(ent), f["lane_words"].to(ent), tables,
                          prm["precision_bits"], cols * p, table_of=tid, what=f"tensor {spec.name!r} nwc latents",
                          backend=rans_backend).view(-1, CHUNK).to(dev)
        if compiled:  # compiled steps around the MLP, no copies
            with one_thread():
                return decode_weight_cpu(dec, sym.view(cols, p), lv, f["row_scale"], rows, FAST_BLOCK_CPU,
                                         threads).to(dtype)
        if dev.type == "cpu":
            out = decode_columns(dec, sym.view(cols, p // CHUNK, CHUNK), lv, DECODE_BLOCK_CPU, threads)
        else:
            out = decode_columns(dec, sym.view(cols, p // CHUNK, CHUNK), lv, DECODE_BLOCK_GPU)
        w = out[:, :rows].t()
        return (w * f["row_scale"].to(torch.float32)[:, None]).to(dtype).contiguous()

    # ---- healing ------------------------------------------------------------------------------
    @classmethod
    def trainable_fields(cls, spec: TensorSpec, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The per-row scales; the entropy-coded latents, rate levels and the shared network stay fixed."""
        return ("row_scale",)

    @classmethod
    def decode_train(cls, fields: Mapping[str, Tensor], spec: TensorSpec, params: Mapping[str, Any],
                     shared: SharedState, memo: dict[str, Tensor] | None = None) -> Tensor:
        """The network's normalised rows (decoded once, kept in ``memo``) times ``row_scale``."""
        dt = train_dtype(fields, ("row_scale",))
        unit = memo.get("unit") if memo is not None else None
        if unit is None:
            unit = cls.decode(Encoded(stored_at_unit(fields, ("row_scale",), ()), dict(params)), spec, shared,
                              fields["row_scale"].device, torch.float32, fast=False)
            unit = unit.reshape(params["rows"], params["cols"])
            if memo is not None:
                memo["unit"] = unit
        return (unit.to(dt) * fields["row_scale"][:, None]).reshape(spec.shape)
