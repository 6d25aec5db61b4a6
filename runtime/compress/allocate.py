"""CVXQ bit allocation: per-group depths that hit a whole-checkpoint size, found by bisection.

For a group ``k`` (``G`` output rows x 1 input column, see ``thawed.codecs.cvxq``) with weight
variance ``var_k`` and mean sensitivity ``sens_k`` (accumulated squared gradients, from
``runtime/compress/calibrate.py``), the high-rate model of its output distortion at depth ``B`` is
``D_k(B) ~ cnt_k * sens_k * var_k * 2**(-2B)``. Minimising ``sum_k D_k`` subject to a bit budget
gives, for the dual variable ``lambda`` (distortion per bit)::

    B_k = clamp(round(1/2 * log2(score_k / lambda)), 0, 8),    score_k = sens_k * var_k * cnt_k / G

The stored size is monotone in ``lambda``, so bisection on ``log2 lambda`` finds the smallest
``lambda`` (best quality) whose size fits the budget; sizes are exact byte counts of the payload
(``cvxq_nbytes``: codes, depths, locations, scales), to within one group's bits.

Whole-file plan (``plan_cvxq``), two budgets so that both figures ``inspect`` reports hit the target:
1. linear layers: ``target * linear weights`` bits, minus any linear tensors a ``--codec-for``
   override gives another codec (their real size is measured by encoding them);
2. the rest: ``target * all weights`` minus (1), minus raw tensors (norms), tensors of other
   codecs and an estimate of the file header; this budget goes to the cvxq-planned embeddings and
   untied lm_head, which absorb the overhead (for SmolLM2-135M at 3.5 bpw the tied embedding gets
   ~0.1 bpw less than the target).
A joint single-lambda allocation would be a little better in distortion but would not put the
linear layers at the target; the two-budget split is the stated requirement.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor

from thawed.codecs import EncodeContext, TensorSpec
from thawed.codecs.cvxq import MAX_DEPTH, cvxq_nbytes, group_layout, group_stats
from thawed.codecs.errors import ThawedError

from .calib_data import DEFAULT_CALIB_TOKENS

__all__ = ["GroupSet", "depths_at", "allocate", "plan_cvxq", "CvxqPlan", "estimate_header_bytes", "fixed_entry"]

log = logging.getLogger(__name__)

# Room left in the header estimate for the settings record written after planning.
HEADER_SLACK_BYTES = 1024


@dataclass
class GroupSet:
    """The groups of one tensor, as the allocator needs them."""

    name: str
    group_rows: int  # G actually used for this tensor (min(group_rows, m))
    shape: tuple[int, int]  # [R, n]
    score: Tensor  # [R*n] float64: sens * var * cnt / G
    numel: int
    bias_rows: int = 0  # rows of a stored bias correction (F16 each), 0 when none

    @property
    def groups(self) -> int:
        return self.score.numel()


def _depths(score: Tensor, log2_lam: float, min_depth: int = 0) -> Tensor:
    with torch.no_grad():
        b = torch.floor(0.5 * (torch.log2(score) - log2_lam) + 0.5)
        b = torch.nan_to_num(b, nan=0.0, neginf=0.0, posinf=float(MAX_DEPTH))
        return b.clamp_(min_depth, MAX_DEPTH).to(torch.int64)


def _bits(sets: list[GroupSet], depths: list[Tensor]) -> int:
    total = 0
    for s, d in zip(sets, depths):
        counts = torch.bincount(d, minlength=MAX_DEPTH + 1).tolist()
        total += 8 * cvxq_nbytes(s.groups, s.group_rows, counts, s.bias_rows)
    return total


def depths_at(sets: list[GroupSet], log2_lam: float, min_depth: int = 0) -> list[Tensor]:
    return [_depths(s.score, log2_lam, min_depth) for s in sets]


def allocate(sets: list[GroupSet], budget_bits: float, *, min_depth: int = 0, strict: bool = True,
             iters: int = 64) -> tuple[list[Tensor], float, int]:
    """Depths for every set that fit ``budget_bits`` as closely as possible from below.

    Returns ``(depths per set as [R*n] int64, log2 lambda, total bits)``. When even the smallest
    allocation (every group at ``min_depth``) does not fit, raises (``strict``) or warns and
    returns that smallest allocation.
    """
    if not sets:
        return [], 0.0, 0
    floor = [torch.full((s.groups,), min_depth, dtype=torch.int64) for s in sets]
    floor_bits = _bits(sets, floor)
    if floor_bits > budget_bits:
        numel = sum(s.numel for s in sets)
        msg = (f"the target leaves {budget_bits / numel:.3f} bits/weight for {len(sets)} cvxq tensors but their "
               f"side information alone takes {floor_bits / numel:.3f}")
        if strict:
            raise ThawedError(msg + "; raise --target-bpw or group_rows")
        log.warning("%s: every group gets depth %d and the file ends up above the target", msg, min_depth)
        return floor, math.inf, floor_bits
    scores = torch.cat([s.score for s in sets])
    pos = scores[scores > 0]
    if pos.numel() == 0:
        d = depths_at(sets, 0.0, min_depth)
        return d, 0.0, _bits(sets, d)
    lo = float(torch.log2(pos.min())) - 2 * MAX_DEPTH - 2  # every positive group at depth 8
    hi = float(torch.log2(pos.max())) + 2  # every group at depth min_depth
    d_lo = depths_at(sets, lo, min_depth)
    if _bits(sets, d_lo) <= budget_bits:
        return d_lo, lo, _bits(sets, d_lo)
    best = depths_at(sets, hi, min_depth)
    best_bits = _bits(sets, best)
    for _ in range(iters):  # invariant: bits(hi) <= budget < bits(lo)
        mid = 0.5 * (lo + hi)
        d = depths_at(sets, mid, min_depth)
        b = _bits(sets, d)
        if b <= budget_bits:
            hi, best, best_bits = mid, d, b
        else:
            lo = mid
        if hi - lo < 1e-9:
            break
    return best, hi, best_bits


def fixed_entry(codec_name: str, codec, spec: TensorSpec, get: Callable, seed: int) -> tuple[tuple, int]:
    """A tensor whose size the planner does not choose: its header entry (for
    ``estimate_header_bytes``) and its stored bytes -- a raw tensor's own, another codec's as it
    encodes it. Shared by the cvxq and nwc planners."""
    if codec_name == "raw":
        nbytes = spec.numel * torch.empty((), dtype=spec.dtype).element_size()
        return (spec.name, spec, "raw", codec.version, {"data": (spec.dtype, tuple(spec.shape))}, {}), nbytes
    enc = codec.encode(get(spec.name), spec, EncodeContext(name=spec.name, role=spec.role, seed=seed))
    fields = {f: (t.dtype, tuple(t.shape)) for f, t in enc.fields.items()}
    return (spec.name, spec, codec_name, codec.version, fields, enc.params), enc.nbytes


def estimate_header_bytes(entries: list[tuple[str, TensorSpec, str, int, dict, dict]], src: str,
                          settings: dict, file_bytes: int) -> int:
    """The payload file's header as the writer will encode it, from planned entries
    ``(name, spec, codec, codec_version, fields {name: (dtype, shape)}, params)``. Offsets and
    checksums take their final widths; the result is within a few hundred bytes."""
    from ..format import (DTYPE_TO_CODE, FORMAT_NAME, FORMAT_VERSION, HEADER_CHECKSUM_KEY, encode_header,
                         encode_index, field_key, index_entry_dict)

    json_dumps = __import__("json").dumps
    index = [(name, index_entry_dict(spec, codec, ver, list(fields), params, "crc32:00000000"))
             for name, spec, codec, ver, fields, params in entries]
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), HEADER_CHECKSUM_KEY: "crc32:00000000",
            "index": encode_index(index),
            "shared": "{}", "shared_checksums": "{}", "source": src,
            "settings": json_dumps(settings, sort_keys=True, separators=(",", ":"))}
    off = file_bytes  # every offset gets the width of the largest one
    tensors = [(field_key(name, f), DTYPE_TO_CODE[dt], shape, off, off)
               for name, _, _, _, fields, _ in entries for f, (dt, shape) in fields.items()]
    return len(encode_header(meta, tensors)) + HEADER_SLACK_BYTES


@dataclass
class CvxqPlan:
    """What the planning step hands the tensor loop: name -> [R, n] depths, plus a record."""

    depths: dict[str, Tensor]
    record: dict = field(default_factory=dict)
    input_means: dict[str, Tensor] = field(default_factory=dict)  # bias correction: name -> E[x] [n]


def plan_cvxq(src: str | Path, names: Iterable[str], shape_dtype: Callable, get: Callable,
              roles: dict[str, str], choose: Callable, target_bpw: float, *, calib_tokens: int = DEFAULT_CALIB_TOKENS,
              seed: int = 0, sensitivities: dict[str, Tensor] | None = None,
              input_means: dict[str, Tensor] | None = None, min_depth_nonlinear: int = 0,
              calib=None) -> CvxqPlan:
    """Calibrate, then allocate depths so linear layers and the whole file both hit ``target_bpw``.

    ``choose(name, role, dtype, ndim) -> CodecChoice`` is the compression plan; ``get(name)`` reads
    a source tensor. ``sensitivities`` (name -> per-weight squared gradients) skips calibration.
    Linear tensors whose cvxq encoder has ``bias`` on get a bias correction: their calibration
    input means (``input_means``, else one forward pass over the calibration text) go into the
    plan, and the correction's bytes into the linear budget.
    Tied parameters that the source stores once are calibrated under the stored name.
    ``calib``: the calibration data (``runtime/compress/calib_data.py``: a ``CalibData`` shared with other
    stages, a ``CalibSpec``, or None for the default self-generated text).
    """
    t0 = time.perf_counter()
    if not 0 < target_bpw <= 16:
        raise ThawedError(f"--target-bpw must be in (0, 16], got {target_bpw}")
    names = list(names)
    record: dict = {"target_bpw": target_bpw}
    if sensitivities is None:
        from .calibrate import weight_sensitivities

        cal = weight_sensitivities(src, calib_tokens, seed=seed, calib=calib)
        sensitivities = cal.sens
        record.update(calib_tokens=cal.tokens, calib_windows=cal.windows, calib_seconds=round(cal.seconds, 1),
                      calib_data=cal.data)
    lin_sets: list[GroupSet] = []
    rest_sets: list[GroupSet] = []
    fixed_lin = fixed_rest = 0  # bits of tensors the plan gives other codecs
    numel_lin = numel_all = 0
    encoders: dict = {}
    entries: list = []  # for the header estimate: (name, spec, codec, version, fields, params)
    specs: dict[str, TensorSpec] = {}
    cvxq_version = 1
    means: dict[str, Tensor] = {}
    for name in names:
        shape, dtype = shape_dtype(name)
        role = roles.get(name, "other")
        numel = math.prod(shape)
        numel_all += numel
        if role == "linear":
            numel_lin += numel
        choice = choose(name, role, dtype, len(shape))
        spec = specs[name] = TensorSpec(name=name, shape=tuple(shape), dtype=dtype, role=role)
        if choice.name != "cvxq":
            codec = encoders.get(choice) or encoders.setdefault(choice, choice.build())
            entry, nbytes = fixed_entry(choice.name, codec, spec, get, seed)
            entries.append(entry)
            if role == "linear":
                fixed_lin += 8 * nbytes
            else:
                fixed_rest += 8 * nbytes
            continue
        codec = encoders.get(choice) or encoders.setdefault(choice, choice.build())
        gr = codec.group_rows
        cvxq_version = codec.version
        w = get(name)
        sens = sensitivities.get(name)
        if sens is None:
            log.warning("no calibration sensitivity for %s; using weight variance alone", name)
        elif tuple(sens.shape) != tuple(shape):
            raise ThawedError(f"calibration sensitivity of {name!r} has shape {list(sens.shape)}, expected {list(shape)}")
        var, s, cnt = group_stats(w, gr, sens)
        m, n, g, r = group_layout(tuple(shape), gr)
        bias_rows = m if codec.bias and role == "linear" else 0
        if bias_rows:
            if input_means is None:
                from .calibrate import linear_input_means

                t1 = time.perf_counter()
                input_means = linear_input_means(src, calib_tokens, calib=calib)
                record["bias_calib_seconds"] = round(time.perf_counter() - t1, 1)
            if name not in input_means:
                log.warning("no calibration input mean for %s; it gets no bias correction", name)
                bias_rows = 0
            else:
                means[name] = input_means[name]
        gs = GroupSet(name, g, (r, n), s * var * cnt / g, numel, bias_rows)
        (lin_sets if role == "linear" else rest_sets).append(gs)
        del w
    lin_budget = target_bpw * numel_lin - fixed_lin
    lin_depths, lin_lam, lin_bits = allocate(lin_sets, lin_budget)
    # Header: field shapes of cvxq tensors depend on their depth counts; typical counts (all
    # groups at the target depth) give the right digit widths to within a few bytes per entry.
    typical = min(MAX_DEPTH, max(0, round(target_bpw)))
    for gs in lin_sets + rest_sets:
        counts = [0] * (MAX_DEPTH + 1)
        counts[typical] = gs.groups
        gspec = specs[gs.name]
        fields = {"depth": (torch.uint8, (-(-gs.groups // 8) * 4,)), "loc": (torch.float16, gs.shape),
                  "scale": (torch.float16, (gs.groups,)), "codes": (torch.uint8, (gs.numel * typical // 8,))}
        params = {"group_rows": gs.group_rows, "counts": counts}
        if gs.bias_rows:
            fields["bias"] = (torch.float16, (gs.bias_rows,))
            params["bias"] = True
        entries.append((gs.name, gspec, "cvxq", cvxq_version, fields, params))
    record_guess = dict(record, log2_lambda_linear=0.0, log2_lambda_rest=0.0, predicted_linear_bpw=0.0,
                        predicted_file_bpw=0.0, rest_bpw=0.0, depth_histogram=[10**6] * (MAX_DEPTH + 1),
                        plan_seconds=0.0)
    header_bits = 8 * estimate_header_bytes(entries, str(src), {"cvxq_plan": record_guess, "plan": {}, "seed": seed},
                                            int(target_bpw * numel_all / 8))
    rest_budget = target_bpw * numel_all - lin_bits - fixed_lin - fixed_rest - header_bits
    # The file header and raw tensors are fixed costs; on a tiny model they can exceed the whole
    # target, so this budget is best effort (the linear one is strict).
    rest_depths, rest_lam, rest_bits = allocate(rest_sets, rest_budget, min_depth=min_depth_nonlinear, strict=False)
    depths = {s.name: d.view(s.shape).to(torch.uint8) for s, d in zip(lin_sets + rest_sets, lin_depths + rest_depths)}
    pred_lin = (lin_bits + fixed_lin) / numel_lin if numel_lin else 0.0
    pred_all = (lin_bits + rest_bits + fixed_lin + fixed_rest + header_bits) / numel_all if numel_all else 0.0
    hist = torch.bincount(torch.cat([d.reshape(-1).long() for d in depths.values()]), minlength=MAX_DEPTH + 1) \
        if depths else torch.zeros(MAX_DEPTH + 1)
    record.update(
        log2_lambda_linear=round(lin_lam, 4), log2_lambda_rest=round(rest_lam, 4) if math.isfinite(rest_lam) else None,
        predicted_linear_bpw=round(pred_lin, 5), predicted_file_bpw=round(pred_all, 5),
        rest_bpw=round(rest_bits / max(1, sum(s.numel for s in rest_sets)), 4),
        depth_histogram=[int(x) for x in hist.tolist()], plan_seconds=round(time.perf_counter() - t0, 1),
    )
    log.info("cvxq plan: %s", record)
    record["bias_corrected_tensors"] = len(means)
    return CvxqPlan(depths, record, means)
