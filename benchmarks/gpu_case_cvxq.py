"""cvxq payloads for ``benchmarks/gpu_bench.py``: realistic mixed depths at about 4.25 bits/weight.

Weights: random normal with a log-normal scale per input column (sigma 0.5), so the group variances
spread the way real linear layers' do and the allocator hands out mixed depths (mostly 3..6, some
0..2 and 7..8). Depths: the project's allocator (``runtime/compress/allocate.allocate``) on the group
variances alone (no gradient sensitivities, as docs/CVXQ.md's SQNR floors do) at a 4.25 bpw budget
that counts every stored byte (codes, depths, locations, scales). Group rows 192 (the default).

Quantisation: the codec's own encoder would take minutes on 4096x11008 (a CPU grid search of 7
candidates per group), so this builds the payload on ``device`` with the encoder's first
candidate only -- location = the group's median, scale = mean |w - median| x the depth's centre
multiplier (``cvxq.SCALE_CENTRE``), nearest level -- and the exact layout of ``Cvxq.encode``
(depth-sorted segments through ``pack_bits``). Decode speed does not depend on which candidate won;
the payload passes ``Cvxq.expected_fields`` and decodes with the reference like any other.
Takes well under a second per SmolLM2 shape and about a second for 4096x11008 on the GPU machine.
"""

from __future__ import annotations

import torch

from thawed.codecs import Encoded, SharedState, TensorSpec
from thawed.codecs.bitpack import pack_bits
from thawed.codecs.cvxq import F16_MAX, F16_TINY, MAX_DEPTH, SCALE_CENTRE, Cvxq, group_layout, levels
from thawed.runtime.compress.allocate import GroupSet, allocate

NAME = "cvxq"
GROUP_ROWS = 192
TARGET_BPW = 4.25


def payload(shape: tuple[int, int], device: torch.device, seed: int = 0) -> tuple[Encoded, TensorSpec, SharedState]:
    """A cvxq payload of a ``shape`` (out x in) weight on ``device``, about 4.25 bits/weight."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    col = torch.exp(0.5 * torch.randn(n, generator=gen))
    w = (torch.randn(m, n, generator=gen) * 0.02 * col).to(device)
    m, n, g, r = group_layout(shape, GROUP_ROWS)
    if r * g > m:  # the encoder pads the last block with copies of the last row
        w = torch.cat([w, w[-1:].expand(r * g - m, n)], 0)
    wg = w.view(r, g, n).permute(0, 2, 1).reshape(r * n, g)  # [K, G] groups, rows of a block along G
    var = wg.double().var(1, unbiased=False).cpu()
    plan, _, _ = allocate([GroupSet("bench.weight", g, (r, n), var, m * n)], TARGET_BPW * m * n)
    depth = plan[0].to(device)
    counts = torch.bincount(depth, minlength=MAX_DEPTH + 1).tolist()
    order = torch.argsort(depth, stable=True)
    med = wg.median(dim=1).values
    mad = (wg - med[:, None]).abs().mean(1).clamp_min(F16_TINY)
    loc = wg.mean(1).clamp(-F16_MAX, F16_MAX).to(torch.float16)  # depth 0: the mean
    scales, segments, start = [], [], counts[0]
    for b in range(1, MAX_DEPTH + 1):
        idx = order[start:start + counts[b]]
        start += counts[b]
        if not counts[b]:
            continue
        lo = med[idx].to(torch.float16)
        sc = (mad[idx] * SCALE_CENTRE[b]).clamp(F16_TINY, F16_MAX).to(torch.float16)
        lv = levels(b, device)
        q = torch.bucketize((wg[idx] - lo.float()[:, None]) / sc.float()[:, None], (lv[1:] + lv[:-1]) * 0.5)
        loc[idx] = lo
        scales.append(sc)
        segments.append(pack_bits(q.reshape(-1), b))
    fields = {
        "depth": pack_bits(depth, 4),
        "loc": loc.view(r, n).contiguous(),
        "scale": (torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float16, device=device)).contiguous(),
        "codes": (torch.cat(segments) if segments else torch.zeros(0, dtype=torch.uint8, device=device)).contiguous(),
    }
    enc = Encoded(fields, {"group_rows": GROUP_ROWS, "counts": [int(c) for c in counts]})
    spec = TensorSpec("bench.weight", tuple(shape), torch.bfloat16, "linear")
    Cvxq.expected_fields(spec, enc.params)  # the layout is the codec's
    return enc, spec, {}
