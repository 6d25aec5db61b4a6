"""Whole-checkpoint rate allocation for ``nwc``: one Lagrange multiplier across tensors.

``nwc:target_bpw=B`` (with ``alloc=global``, the default) asks for the whole file -- every byte
``thawed inspect`` counts: payloads, side information, the shared decoder network and entropy
tables, raw tensors and the header -- at ``B`` bits per weight. Each nwc tensor ``t`` gets a grid
position ``r_t`` (``codecs/nwc.py``: the base rate index, the fraction of columns one step higher,
then the importance bonuses) chosen to minimise the summed distortion under that budget:

- **rate** ``R_t(r)``: coded bits per column at every rate index, measured on sampled columns
  (``Nwc.rate_profile``, the measurement ``target_bpw`` already made per tensor), summed over the
  column levels position ``r`` gives, plus side bits;
- **distortion** ``D_t(r) = sum_j a_j * q_t(k_j(r))``: ``q_t(k)`` is the measured mean squared
  error of the row-normalised weights at rate index ``k``, and ``a_j = sum_i F_ij * s_i**2`` the
  column's sensitivity, with ``F`` the diagonal Fisher information of the model's output
  (``calibrate.weight_sensitivities``, squared gradients on the default self-generated calibration
  text -- the sensitivities cvxq allocates with) and ``s_i`` the row scales. ``sum_ij F_ij dW_ij**2``
  is the second-order change of the KL divergence between the dense and compressed model.

For a multiplier ``lambda`` every tensor takes the candidate position (steps of ``STEP`` on the
grid) minimising ``D_t + lambda * R_t``; the total size falls as ``lambda`` grows, and bisection on
``log2 lambda`` finds the smallest ``lambda`` whose file fits the budget -- equal slope
``dD/dR`` everywhere, as CVXQ's planner (``allocate.py``) does for bit depths.

Imported only by the compression pipeline; the runtime never imports it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor

from thawed.codecs import TensorSpec
from thawed.codecs.errors import ThawedError

__all__ = ["TensorCurve", "tensor_curve", "fisher_weights", "kl_weights", "probe_noise", "SharedCost", "allocate_rates", "plan_nwc", "NwcPlan", "STEP"]

log = logging.getLogger(__name__)

STEP = 0.05  # grid positions between candidate rates (~0.0125 bit per weight)
SHARED_ENTRY_BYTES = 100  # header bytes per shared-state tensor (name, dtype, shape, offsets, checksum)
FILL_REACH = 8  # candidate steps a budget-filling move may jump
KL_TOKENS = 512  # calibration tokens of each per-tensor KL probe (sens=kl)


@dataclass
class TensorCurve:
    """One tensor's candidate rates with their estimated bits and distortion."""

    name: str
    numel: int
    rates: Tensor  # [C] float64 grid positions
    bits: Tensor  # [C] float64: estimated payload bits (side information included)
    dist: Tensor  # [C] float64: sensitivity-weighted squared error
    used: list[int]  # [C]: bit k set when some column uses rate index k


def fisher_weights(prof, sens: Tensor | None, name: str) -> Tensor:
    """Column weights ``a_j = sum_i F_ij s_i**2`` [cols] float64 from per-weight Fisher sensitivities
    (None: every weight counts 1)."""
    s2 = prof.row_scale.double().square()  # [rows]
    if sens is None:
        return s2.sum().expand(prof.cols).clone()
    if tuple(sens.shape) != (prof.rows, prof.cols):
        raise ThawedError(f"calibration sensitivity of {name!r} has shape {list(sens.shape)}, "
                          f"expected {[prof.rows, prof.cols]}")
    return s2 @ sens.double()


def kl_weights(prof, kl: float, rho2: float, importance: Tensor | None) -> Tensor:
    """Column weights [cols] float64 from a measured KL: the tensor's output error grows with
    ``sum_j m_j q(k_j)`` (``m_j`` = the column's input second moment, 1 without calibration), and
    noise of normalised variance ``rho2`` on every weight cost ``kl``, so ``a_j = kl m_j / (rho2 sum m)``."""
    m = torch.ones(prof.cols, dtype=torch.float64) if importance is None else \
        importance.detach().to("cpu", torch.float64).reshape(-1).clamp_min(0)
    tot = float(m.sum())
    if tot <= 0:
        m, tot = torch.ones(prof.cols, dtype=torch.float64), float(prof.cols)
    return m * (max(kl, 0.0) / (rho2 * tot))


def probe_noise(prof, target_bpw: float) -> float:
    """Normalised error variance of the codec near ``target_bpw`` for this tensor (every column at
    the rate index whose bits come closest): the noise a KL probe should add."""
    bpw = (prof.bits_per_col * prof.cols + prof.side_bits) / (prof.rows * prof.cols)
    return float(prof.mse[int(torch.argmin((bpw - target_bpw).abs()))])


def tensor_curve(codec, prof, name: str, importance: Tensor | None, a: Tensor, step: float = STEP,
                 spread: float | None = None) -> TensorCurve:
    """Candidate positions ``0, step, ..., grid - 1`` of ``codec`` (an ``Nwc``) for one tensor with
    rate profile ``prof`` (``Nwc.rate_profile``) and column weights ``a`` [cols] (``fisher_weights``,
    ``kl_weights``). ``spread``: keep only the positions whose estimated bpw is within ``spread``
    of the codec's ``target_bpw`` (the nearest one when none is)."""
    rows, cols = prof.rows, prof.cols
    grid = codec.grid
    n = int(round((grid - 1) / step)) + 1
    rates = torch.linspace(0.0, grid - 1.0, n, dtype=torch.float64)
    bits = torch.empty(n, dtype=torch.float64)
    dist = torch.empty(n, dtype=torch.float64)
    used: list[int] = []
    imp = None if importance is None else importance.detach().to("cpu", torch.float32).reshape(-1)
    for i, r in enumerate(rates.tolist()):
        lv = codec.levels_at(r, cols, imp)
        bits[i] = float(prof.bits_per_col[lv].sum()) + prof.side_bits
        dist[i] = float((a * prof.mse[lv]).sum())
        used.append(sum(1 << k for k in torch.unique(lv).tolist()))
    keep = torch.ones(n, dtype=torch.bool)
    if spread is not None:  # a trust region around the target: every tensor within +-spread bpw of it
        bpw = bits / (rows * cols)
        keep = (bpw - codec.target_bpw).abs() <= spread
        if not bool(keep.any()):
            keep[int(torch.argmin((bpw - codec.target_bpw).abs()))] = True
    sel = torch.nonzero(keep).flatten()
    return TensorCurve(name, rows * cols, rates[sel], bits[sel], dist[sel], [used[int(i)] for i in sel])


@dataclass(frozen=True)
class SharedCost:
    """Bits of the file's shared nwc state: ``fixed`` (the decoder network) once any rate index is
    used, plus ``per_index`` (one entropy table) for every distinct rate index used, plus the rate
    indices ``done`` that tensors already written use (their tables are paid for)."""

    fixed: float = 0.0
    per_index: float = 0.0
    done: int = 0

    def __call__(self, mask: int) -> float:
        mask |= self.done
        return 0.0 if mask == 0 else self.fixed + self.per_index * bin(mask).count("1")


class _Stack:
    """The curves as [T, C] matrices (padded with +inf), so each multiplier is one argmin."""

    def __init__(self, curves: list[TensorCurve], shared: SharedCost) -> None:
        c = max(len(x.rates) for x in curves)
        self.bits = torch.full((len(curves), c), math.inf, dtype=torch.float64)
        self.dist = torch.full((len(curves), c), math.inf, dtype=torch.float64)
        self.used = torch.zeros((len(curves), c), dtype=torch.int64)
        for t, x in enumerate(curves):
            n = len(x.rates)
            self.bits[t, :n], self.dist[t, :n] = x.bits, x.dist
            if max(x.used).bit_length() > 63:
                raise ThawedError(f"tensor {x.name!r}: the global nwc plan handles networks of at most 63 rate "
                                  "indices; use alloc=tensor with this network")
            self.used[t, :n] = torch.tensor(x.used, dtype=torch.int64)
        self.len = torch.tensor([len(x.rates) for x in curves])
        self.shared = shared
        self.ks = torch.arange(63, dtype=torch.int64)

    def _mask(self, idx: Tensor) -> int:
        present = ((self.used.gather(1, idx[:, None]) >> self.ks) & 1).any(0)
        return sum(1 << int(k) for k in torch.nonzero(present).flatten().tolist())

    def total(self, idx: Tensor) -> float:
        return float(self.bits.gather(1, idx[:, None]).sum()) + self.shared(self._mask(idx))

    def pick(self, log2_lam: float) -> Tensor:
        return torch.argmin(self.dist + 2.0 ** log2_lam * self.bits, dim=1)

    def fill(self, idx: Tensor, budget_bits: float, reach: int = FILL_REACH) -> Tensor:
        """Spend what the equal-slope choice leaves of the budget (its discrete steps can skip a
        gap): one move at a time, up to ``reach`` candidates up (the measured curves are not
        exactly convex), the move saving the most distortion per bit -- the tables of rate indices
        it adds to the file included -- that still fits."""
        idx = idx.clone()
        rows = torch.arange(len(idx))
        used = self.total(idx)
        while True:
            mask = self._mask(idx) | self.shared.done
            best = (-1.0, -1, 0)
            for step in range(1, reach + 1):
                nxt = idx + step
                live = nxt < self.len
                nxt = torch.minimum(nxt, self.len - 1)
                new = ((self.used[rows, nxt][:, None] & ~mask) >> self.ks) & 1  # rate indices the move adds
                db = self.bits[rows, nxt] - self.bits[rows, idx] + self.shared.per_index * new.sum(1)
                dd = self.dist[rows, idx] - self.dist[rows, nxt]
                ok = live & (db > 0) & (dd > 0) & (used + db <= budget_bits)
                if bool(ok.any()):
                    gain = torch.where(ok, dd / db.clamp_min(1e-12), torch.tensor(-1.0, dtype=torch.float64))
                    t = int(torch.argmax(gain))
                    if float(gain[t]) > best[0]:
                        best = (float(gain[t]), t, step)
            if best[1] < 0:
                return idx
            idx[best[1]] += best[2]
            b = self.total(idx)
            if b > budget_bits:  # cannot happen while the shared cost is as modelled; never overshoot
                idx[best[1]] -= best[2]
                return idx
            used = b


def allocate_rates(curves: list[TensorCurve], budget_bits: float, shared: SharedCost = SharedCost(),
                   iters: int = 80) -> tuple[list[int], float, float]:
    """The candidate index of every curve at the smallest multiplier whose total (curves' bits plus
    the shared state they need) fits ``budget_bits``, then what is left of the budget spent move
    by move where it saves the most distortion per bit.

    Returns ``(indices, log2 lambda, total bits)``. Raises when even the lowest rate of every
    tensor does not fit, naming how far off it is.
    """
    if not curves:
        return [], 0.0, shared(0)
    st = _Stack(curves, shared)
    low = torch.argmin(st.bits, dim=1)
    if st.total(low) > budget_bits:
        numel = sum(c.numel for c in curves)
        raise ThawedError(f"the target leaves {budget_bits / numel:.3f} bits/weight for {len(curves)} nwc tensors but "
                          f"their lowest rate takes {st.total(low) / numel:.3f}; raise target_bpw")
    top = st.len - 1
    if st.total(top) <= budget_bits:
        return top.tolist(), -math.inf, st.total(top)
    lo, hi = -200.0, 200.0  # log2 lambda: lo -> every tensor at its highest rate, hi -> its lowest
    best = st.pick(hi)
    if st.total(best) > budget_bits:  # an extreme multiplier that still leaves ties above the lowest rate
        best = low
    for _ in range(iters):  # invariant: total(hi) <= budget < total(lo)
        mid = 0.5 * (lo + hi)
        idx = st.pick(mid)
        if st.total(idx) <= budget_bits:
            hi, best = mid, idx
        else:
            lo = mid
    best = st.fill(best, budget_bits)
    return best.tolist(), hi, st.total(best)


class NwcPlan:
    """Grid positions for ``Nwc.encode`` (``extras["nwc_rate"]``), kept on budget while encoding.

    The sizes the plan starts from are estimates (bits measured on sampled columns), so the
    pipeline reports each tensor's real size (``encoded``) and ``rate`` re-allocates the tensors
    not yet encoded with what is really left: the file ends within about one tensor's candidate
    step of the target instead of carrying every tensor's sampling error.
    """

    def __init__(self, curves: list[TensorCurve], budget_bits: float, shared: SharedCost, record: dict) -> None:
        self._curves = {c.name: c for c in curves}
        self._budget = budget_bits
        self._shared = shared
        self._done_bits = 0.0
        self._done_mask = 0
        self._done: set[str] = set()
        self._rates: dict[str, float] = {}
        self.record = record
        self._replan()
        self.initial = dict(self._rates)

    def __contains__(self, name: str) -> bool:
        return name in self._curves

    def _replan(self) -> None:
        pending = [c for n, c in self._curves.items() if n not in self._done]
        if not pending:
            return
        shared = SharedCost(self._shared.fixed, self._shared.per_index, self._done_mask)
        try:
            idx, lam, bits = allocate_rates(pending, self._budget - self._done_bits, shared, iters=60)
        except ThawedError as exc:
            if not self._done:  # before anything is written: the target is impossible, say so
                raise
            # the tensors written so far came out larger than estimated: finish at the lowest rates
            log.warning("nwc plan: %s after %d tensors; the rest get their lowest rate and the file ends "
                        "above the target", exc, len(self._done))
            idx = [int(torch.argmin(c.bits)) for c in pending]
            lam, bits = math.inf, sum(float(c.bits[i]) for c, i in zip(pending, idx))
        for c, i in zip(pending, idx):
            self._rates[c.name] = float(c.rates[i])
        self.log2_lambda, self.predicted_bits = lam, bits + self._done_bits

    def rate(self, name: str) -> float:
        """The grid position for ``name``, given the real sizes of the tensors encoded so far."""
        if name not in self._curves:
            raise KeyError(f"{name!r} is not planned by the nwc plan")
        return self._rates[name]

    def encoded(self, name: str, bits: float, levels: Iterable[int]) -> None:
        """``name`` took ``bits`` (payload, side information included) and used these rate indices."""
        self._done.add(name)
        self._done_bits += bits
        for k in levels:
            self._done_mask |= 1 << int(k)
        self._replan()


def plan_nwc(src: str | Path, names: Iterable[str], shape_dtype: Callable, get: Callable, roles: dict[str, str],
             choose: Callable, build: Callable, sensitivities: dict[str, Tensor] | None,
             importance: Callable[[str], Tensor | None], settings: dict, seed: int = 0, calib=None,
             kl_tokens: int = KL_TOKENS) -> NwcPlan | None:
    """Rates for every tensor whose planned codec is an nwc encoder with ``alloc=global`` and a
    ``target_bpw``, so that the whole file hits that target (None when no tensor is planned so).

    ``choose(name, role, dtype, ndim) -> CodecChoice`` is the compression plan and ``build(choice)``
    its encoder (the pipeline's, so the shared state the plan counts is the state it writes);
    ``get(name)`` reads a source tensor; ``importance(name)`` gives the calibration importance the
    encoder will see (None for none); ``settings`` is the record the checkpoint will carry.
    ``sensitivities``: Fisher per weight (for ``sens=fisher``); ``sens=kl`` measures a KL per tensor
    on ``kl_tokens`` tokens of ``calib`` (``calibrate.tensor_kl_sensitivities``).
    """
    from thawed.codecs.nwc import Nwc

    from .allocate import HEADER_SLACK_BYTES, estimate_header_bytes, fixed_entry

    t0 = time.perf_counter()
    names = list(names)
    curves: list[TensorCurve] = []
    planned: dict[str, Nwc] = {}
    targets: set[float] = set()
    fixed = 0  # bits of every tensor the plan does not choose
    numel_all = 0
    entries: list = []
    specs: dict[str, TensorSpec] = {}
    profiles: dict = {}
    for name in names:
        shape, dtype = shape_dtype(name)
        role = roles.get(name, "other")
        numel = math.prod(shape)
        numel_all += numel
        choice = choose(name, role, dtype, len(shape))
        codec = build(choice)
        spec = specs[name] = TensorSpec(name=name, shape=tuple(shape), dtype=dtype, role=role)
        if isinstance(codec, Nwc) and codec.plans_globally:
            targets.add(float(codec.target_bpw))
            profiles[name] = codec.rate_profile(get(name), spec)
            planned[name] = codec
            continue
        entry, nbytes = fixed_entry(choice.name, codec, spec, get, seed)
        entries.append(entry)
        fixed += 8 * nbytes
    if len(targets) > 1:
        raise ThawedError(f"nwc tensors planned globally ask for different target_bpw values {sorted(targets)}; "
                          "one file has one target: give them the same target_bpw, or alloc=tensor")
    if not planned:
        return None
    target = targets.pop()
    kl: dict[str, float] = {}
    noise = {n: probe_noise(profiles[n], target) for n, c in planned.items() if c.sens == "kl"}
    if noise:
        from .calibrate import tensor_kl_sensitivities

        t1 = time.perf_counter()
        kl = tensor_kl_sensitivities(src, {n: math.sqrt(v) for n, v in noise.items()}, kl_tokens, seed=seed,
                                     calib=calib)
        kl_seconds = round(time.perf_counter() - t1, 1)
    for name, codec in planned.items():
        prof, imp = profiles[name], importance(name)
        if codec.sens == "kl":
            a = kl_weights(prof, kl[name], noise[name], imp)
        else:
            sens = (sensitivities or {}).get(name)
            if sens is None:
                log.warning("no calibration sensitivity for %s; its columns count by row scale alone", name)
            a = fisher_weights(prof, sens, name)
        curves.append(tensor_curve(codec, prof, name, imp, a, spread=codec.spread))
    del profiles
    typical = [int(torch.argmin((c.bits / c.numel - target).abs())) for c in curves]
    for c, i in zip(curves, typical):  # header: field shapes at a typical rate give the digit widths
        rows, cols = specs[c.name].shape
        lanes = max(1, -(-(cols * -(-rows // 16) * 16) // planned[c.name].steps))
        fields = {"row_scale": (torch.float16, (rows,)), "levels": (torch.uint8, (cols,)),
                  "states": (torch.int32, (lanes,)), "lane_words": (torch.int32, (lanes,)),
                  "words": (torch.int16, (int(c.bits[i]) // 16,))}
        params = {"rows": rows, "cols": cols, "lanes": lanes, "n_words": int(c.bits[i]) // 16, "precision_bits": 14,
                  "grid": planned[c.name].grid, "dec_hidden": 64, "rate": 12.3456}
        entries.append((c.name, specs[c.name], "nwc", Nwc.version, fields, params))
    guess = {"target_bpw": target, "log2_lambda": -12.3456, "predicted_file_bpw": 4.56789, "tensors": len(curves),
             "rate_min": 12.3456, "rate_max": 12.3456, "rate_mean": 12.3456, "plan_seconds": 1234.5}
    # the settings record is known here (its plan part as a guess of the same width): little slack needed
    header_bits = 8 * (estimate_header_bytes(entries, str(src), dict(settings, nwc_plan=guess),
                                             int(target * numel_all / 8)) - HEADER_SLACK_BYTES + 256)
    codec0 = next(iter(planned.values()))
    dec_bits = 8 * sum(t.numel() * t.element_size() for t in codec0._net.decoder.values())
    table_bits = 8 * 16 * 256 * 2  # one [16, 256] int16 table per rate index used

    shared = SharedCost(dec_bits + 8 * SHARED_ENTRY_BYTES * len(codec0._net.decoder),
                        table_bits + 8 * SHARED_ENTRY_BYTES)

    budget = target * numel_all - fixed - header_bits
    log.debug("nwc plan: header estimate %d bytes, fixed %d bytes", header_bits // 8, fixed // 8)
    plan = NwcPlan(curves, budget, shared, {})
    vals = torch.tensor(list(plan.initial.values()))
    numel_nwc = sum(c.numel for c in curves)
    nwc_bits = sum(float(c.bits[int(torch.argmin((c.rates - plan.initial[c.name]).abs()))]) for c in curves)
    plan.record.update(
        target_bpw=target, log2_lambda=round(plan.log2_lambda, 4) if math.isfinite(plan.log2_lambda) else None,
        predicted_file_bpw=round((plan.predicted_bits + fixed + header_bits) / numel_all, 5),
        predicted_nwc_bpw=round(nwc_bits / numel_nwc, 5), tensors=len(curves),
        rate_min=round(float(vals.min()), 4), rate_max=round(float(vals.max()), 4),
        rate_mean=round(float(vals.mean()), 4), plan_seconds=round(time.perf_counter() - t0, 1),
        sensitivity=sorted({c.sens for c in planned.values()}))
    if kl:
        plan.record.update(kl_tokens=kl_tokens, kl_seconds=kl_seconds)
    log.info("nwc plan: %s", plan.record)
    return plan
