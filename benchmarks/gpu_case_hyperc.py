"""GPU benchmark case for ``hyperc`` (imported by ``benchmarks/gpu_bench.py``).

Payload: random normal weights (std 0.02) through ``HyperC.encode`` with the scalar (1-D)
codebook at 4.5 bits/weight -- ``dim=1, index_bits=4, group_size=64``: ``target_bpw=4.5``'s 1-D
candidate on SmolLM2's rows (576, 1536 and 11008 weights), the one it keeps on SmolLM2's weights
(docs/HYPERC.md), and the configuration the fused matmul runs; clip search and HQQ refinement on
(the defaults). ``OPTIONS_3D`` is the 3-D vector codebook at 4.5 bpw (``target_bpw=4.5``'s choice
on MiniLM) for a decode-only run (``payload(..., options=OPTIONS_3D)``); its matmul decodes and
calls ``F.linear``.

Encode speed: ``encode`` runs on the CPU and costs several us/weight with these options (measured
~10 us on this project's 2 busy cores: 4096x11008 would take minutes, 1536x576 seconds). So a
matrix of more than ``FULL_ENCODE_MAX`` weights is built from one encoded slab of ``SLAB_ROWS``
rows repeated down the rows (plus an encoded remainder); its bytes are exactly those ``encode``
writes for a matrix whose rows repeat that way (a slab of 8k rows packs into whole bytes). The
kernels have no data-dependent branches, so their timing does not depend on the values; the
decoded matrix still checks against the reference decode. Payloads are cached per shape and seed.
"""

from __future__ import annotations

import torch

from thawed.codecs import EncodeContext, Encoded, SharedState, TensorSpec
from thawed.codecs.hyperc import HyperC

NAME = "hyperc"
OPTIONS = {"dim": 1, "index_bits": 4, "group_size": 64}
OPTIONS_3D = {"dim": 3, "index_bits": 13, "group_size": 192}
SLAB_ROWS = 64  # a multiple of 8: a slab's codes end on a byte boundary
FULL_ENCODE_MAX = 1 << 16  # weights; SmolLM2's shapes and up are built from slabs
_CACHE: dict[tuple, Encoded] = {}  # CPU payloads: gpu_bench asks for the same shape in each section


def _encode(w: torch.Tensor, name: str, options: dict) -> Encoded:
    spec = TensorSpec(name, tuple(w.shape), torch.float32, "linear")
    return HyperC(**options).encode(w, spec, EncodeContext(name))


def payload(shape: tuple[int, int], device: torch.device, seed: int = 0,
            options: dict | None = None) -> tuple[Encoded, TensorSpec, SharedState]:
    """A ``hyperc`` payload of an ``[out, in]`` weight at ~4.5 bpw, fields on ``device``."""
    opts = dict(OPTIONS if options is None else options)
    m, n = shape
    name = f"bench.{m}x{n}.weight"
    spec = TensorSpec(name, (m, n), torch.bfloat16, "linear")
    key = (m, n, seed, tuple(sorted(opts.items())), FULL_ENCODE_MAX)
    if key not in _CACHE:
        if len(_CACHE) >= 16:
            _CACHE.clear()
        _CACHE[key] = _build(m, n, seed, name, spec, opts)
    return _CACHE[key].to(device), spec, {}


def _build(m: int, n: int, seed: int, name: str, spec: TensorSpec, opts: dict) -> Encoded:
    gen = torch.Generator().manual_seed(seed)
    if m * n <= FULL_ENCODE_MAX or m <= SLAB_ROWS:
        return _encode(torch.randn(m, n, generator=gen) * 0.02, name, opts)
    reps, rest = divmod(m, SLAB_ROWS)
    slab = _encode(torch.randn(SLAB_ROWS, n, generator=gen) * 0.02, name, opts)
    parts = [slab] * reps
    if rest:
        parts.append(_encode(torch.randn(rest, n, generator=gen) * 0.02, name, opts))
    fields = {k: torch.cat([p.fields[k] for p in parts]) for k in slab.fields}  # flat streams, [m, G] sides
    enc = Encoded(fields, slab.params)
    HyperC.expected_fields(spec, enc.params)  # same params for every slab: raises if not
    HyperC.checked_fields(enc, spec, "cpu")
    return enc
